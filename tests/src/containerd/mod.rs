//! A real containerd for tests: Debian's containerd 1.6 (scripts/setup installs it) with its
//! own root, state, sockets, config and CNI network in a temp dir; the test images imported;
//! a CRI client on its socket. Dropping it tears everything down (pods, shims, containerd,
//! mounts, the bridge, the directory).
//!
//! Runtime handlers: `runc` (`io.containerd.runc.v2`, for comparison and to prove the harness
//! on any host) and `husk` / `kata` (`io.containerd.husk.v2`, our shim from this build tree).

pub mod config;
pub mod cri;
pub mod images;
pub mod state;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use config::{Layout, Network, ShimSetup};
pub use config::{
    HANDLER_HUSK, HANDLER_HUSK_BAD_CONFIG, HANDLER_HUSK_NO_VMM, HANDLER_KATA, HANDLER_RUNC,
};
pub use cri::{Cri, Pod};
pub use state::HostState;

/// The CRI namespace, where `ctr` must import images for CRI to see them.
pub const K8S_NAMESPACE: &str = "k8s.io";

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Which binary to look for, and where.
fn require_binary(path: &str) {
    assert!(
        Path::new(path).is_file(),
        "{path} is missing: run scripts/setup (Debian packages containerd, runc, \
         containernetworking-plugins)"
    );
}

/// A bridge name and /24 no other test containerd of this host uses at the same time.
fn unique_network() -> Network {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    // 10.250-253.x.0/24 by pid and count: concurrent test processes get different subnets.
    let k = pid.wrapping_mul(31).wrapping_add(n) % 1000;
    Network {
        bridge: format!("hskt{pid}x{n}").chars().take(15).collect(),
        subnet: format!("10.{}.{}.0/24", 250 + k / 250, k % 250),
    }
}

/// A running test containerd.
pub struct Containerd {
    layout: Layout,
    network: Network,
    child: Option<Child>,
    /// Keeps the directory alive; removed last, after everything in it is unmounted.
    dir: Option<tempfile::TempDir>,
}

impl Containerd {
    /// Starts containerd and waits until its CRI answers, with the busybox and pause images
    /// imported. Panics, with containerd's log, if any of it fails.
    pub fn start() -> Containerd {
        for bin in [
            "/usr/bin/containerd",
            "/usr/bin/ctr",
            "/usr/sbin/runc",
            "/usr/bin/containerd-shim-runc-v2",
            "/usr/lib/cni/bridge",
            "/usr/lib/cni/host-local",
            "/usr/lib/cni/loopback",
            "/usr/lib/cni/portmap",
        ] {
            require_binary(bin);
        }
        let busybox = images::busybox_archive();
        let pause = images::pause_archive();

        let dir = tempfile::Builder::new()
            .prefix("husk-ctrd-")
            .tempdir_in("/tmp")
            .expect("create the containerd test directory");
        let layout = Layout::new(dir.path());
        let network = unique_network();
        let shim = ShimSetup {
            binary: crate::bin_dir().join("containerd-shim-husk-v2"),
            config: layout.dir.join("husk.toml"),
        };
        std::fs::create_dir_all(&layout.cni_conf_dir).expect("create the CNI conf dir");
        std::fs::create_dir_all(&layout.pod_logs).expect("create the pod log dir");
        std::fs::write(
            layout.cni_conf_dir.join("10-husk-test.conflist"),
            config::cni_conflist(&layout, &network),
        )
        .expect("write the CNI conflist");
        std::fs::write(&layout.config, config::containerd_toml(&layout, &shim))
            .expect("write containerd's config");
        // The shim's config: the build tree's VMM and guest images.
        let guest = crate::guest_dir();
        std::fs::write(
            &shim.config,
            format!(
                "vmm = \"{}\"\nkernel = \"{}\"\ninitramfs = \"{}\"\n",
                crate::bin_dir().join("husk-vmm").display(),
                guest.join("vmlinux").display(),
                guest.join("husk-initramfs.cpio").display()
            ),
        )
        .expect("write husk.toml");
        for (_, path, text) in config::extra_configs(&shim.config) {
            std::fs::write(path, text).expect("write a test handler's husk.toml");
        }

        let log = std::fs::File::create(&layout.log).expect("create containerd's log");
        // containerd 1.6 finds a shim binary on its PATH (or beside itself): ours first.
        let path = std::env::join_paths(
            shim.binary
                .parent()
                .map(Path::to_path_buf)
                .into_iter()
                .chain(std::env::split_paths(
                    &std::env::var_os("PATH").unwrap_or_default(),
                )),
        )
        .expect("a PATH");
        let child = Command::new("/usr/bin/containerd")
            .env("PATH", path)
            .arg("--config")
            .arg(&layout.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup the log"))
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let mut c = Containerd {
            layout,
            network,
            child: Some(child),
            dir: Some(dir),
        };
        c.wait_ready();
        c.import(&pause);
        c.import(&busybox);
        c.wait_images(&[images::PAUSE, images::BUSYBOX]);
        c
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.layout.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let rt = crate::pod::runtime();
        let mut cri = rt.block_on(async { Cri::connect(&self.layout.socket) });
        loop {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                panic!("containerd exited ({st}); its log:\n{}", self.log_tail());
            }
            if self.layout.socket.exists() {
                match rt.block_on(cri.version()) {
                    Ok(v) => {
                        assert!(
                            v.runtime_api_version.starts_with("v1"),
                            "containerd speaks CRI {}",
                            v.runtime_api_version
                        );
                        return;
                    }
                    Err(e) if Instant::now() > deadline => {
                        panic!(
                            "containerd's CRI did not answer: {e}; log:\n{}",
                            self.log_tail()
                        )
                    }
                    Err(_) => {}
                }
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not come up within {READY_TIMEOUT:?}; log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `ctr -a <socket> -n k8s.io ARGS`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("/usr/bin/ctr")
            .arg("-a")
            .arg(&self.layout.socket)
            .args(["-n", K8S_NAMESPACE])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    }

    /// `ctr` with a deadline: killed after `timeout` (its output so far is returned, and
    /// `status.success()` is false).
    pub fn ctr_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        let child = Command::new("/usr/bin/ctr")
            .arg("-a")
            .arg(&self.layout.socket)
            .args(["-n", K8S_NAMESPACE])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ctr");
        let pid = child.id() as i32;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(timeout) {
            Ok(out) => out.expect("wait for ctr"),
            Err(_) => {
                // SAFETY: our own child, not yet reaped (its waiter thread holds it).
                unsafe { libc::kill(pid, libc::SIGKILL) };
                rx.recv().expect("ctr's waiter").expect("wait for ctr")
            }
        }
    }

    /// Imports an OCI archive into the CRI namespace and unpacks it for the snapshotter.
    pub fn import(&self, archive: &Path) {
        let a = archive.to_string_lossy();
        let out = self.ctr(&["images", "import", "--snapshotter", config::SNAPSHOTTER, &a]);
        assert!(
            out.status.success(),
            "ctr images import {a} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Waits until CRI lists `refs`: it learns of imported images from events.
    fn wait_images(&self, refs: &[&str]) {
        let rt = crate::pod::runtime();
        let mut cri = rt.block_on(async { self.cri() });
        let deadline = Instant::now() + READY_TIMEOUT;
        for r in refs {
            while !rt.block_on(cri.image_present(r)).expect("ImageStatus") {
                assert!(
                    Instant::now() < deadline,
                    "CRI does not see the imported image {r}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// A CRI client on this containerd (call from within a tokio runtime).
    pub fn cri(&self) -> Cri {
        Cri::connect(&self.layout.socket)
    }

    /// containerd's gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.layout.socket
    }

    /// Where pods' CRI logs go (`<dir>/<pod name>/<container name>.log`).
    pub fn pod_log_root(&self) -> &Path {
        &self.layout.pod_logs
    }

    /// RunPodSandbox through this containerd's CRI with its log root and cgroup parent.
    pub async fn run_pod(&self, cri: &mut Cri, name: &str, handler: &str) -> cri::Result<Pod> {
        cri.run_pod(name, handler, &self.layout.pod_logs, &self.cgroup_parent())
            .await
    }

    /// [`Containerd::run_pod`] with hostPort mappings.
    pub async fn run_pod_with_ports(
        &self,
        cri: &mut Cri,
        name: &str,
        handler: &str,
        ports: Vec<k8s_cri::v1::PortMapping>,
    ) -> cri::Result<Pod> {
        cri.run_pod_with_ports(
            name,
            handler,
            &self.layout.pod_logs,
            &self.cgroup_parent(),
            ports,
        )
        .await
    }

    /// The host's address on the test network (the bridge's, the pods' gateway: host-local
    /// gives the subnet's first address to the gateway).
    pub fn gateway(&self) -> std::net::Ipv4Addr {
        let net: std::net::Ipv4Addr = self
            .network
            .subnet
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .expect("the test subnet is an IPv4 CIDR");
        std::net::Ipv4Addr::from(u32::from(net) + 1)
    }

    /// The test subnet (`10.x.y.0/24`).
    pub fn subnet(&self) -> &str {
        &self.network.subnet
    }

    /// The cgroup (in every v1 hierarchy, and cgroup2) that holds this containerd's pods.
    /// Without one, containerd 1.6 puts them under a shared `/k8s.io` that nobody removes.
    pub fn cgroup_parent(&self) -> String {
        let name = self
            .layout
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("/{name}")
    }

    /// The test network's bridge.
    pub fn bridge(&self) -> &str {
        &self.network.bridge
    }

    /// The test directory (root, state, sockets, logs).
    pub fn dir(&self) -> &Path {
        &self.layout.dir
    }

    /// What this containerd may leave on the host: see [`HostState`].
    pub fn host_state(&self) -> HostState {
        HostState::take(&self.layout.dir, &self.layout.socket, &self.cgroup_parent())
    }

    /// Stops every pod (through CRI, as kubelet would), then containerd, then sweeps what
    /// is left: shims of this containerd, mounts under its directory, the bridge, the
    /// directory. Returns what had to be swept by force (empty when everything went away
    /// by itself).
    pub fn stop(mut self) -> Vec<String> {
        self.teardown()
    }

    fn teardown(&mut self) -> Vec<String> {
        let mut swept = Vec::new();
        let Some(mut child) = self.child.take() else {
            return swept;
        };
        if matches!(child.try_wait(), Ok(None)) {
            // On a thread of its own: we may be dropped inside a tokio runtime.
            let socket = self.layout.socket.clone();
            let r = std::thread::spawn(move || {
                let rt = crate::pod::runtime();
                rt.block_on(async move {
                    let mut cri = Cri::connect(&socket);
                    let ids = tokio::time::timeout(Duration::from_secs(5), cri.pod_ids()).await;
                    let mut errors = Vec::new();
                    if let Ok(Ok(ids)) = ids {
                        for id in ids {
                            let r = tokio::time::timeout(
                                Duration::from_secs(30),
                                cri.stop_remove_pod(&id),
                            )
                            .await;
                            errors.push(format!("pod {id} left running (removed: {r:?})"));
                        }
                    }
                    errors
                })
            })
            .join();
            swept.extend(r.unwrap_or_default());
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(child.try_wait(), Ok(None)) {
                swept.push("containerd did not stop on SIGTERM".into());
                let _ = child.kill();
            }
        }
        let _ = child.wait();
        swept.extend(state::sweep(
            &self.layout.dir,
            &self.layout.socket,
            &self.network.bridge,
            &self.cgroup_parent(),
        ));
        if let Some(dir) = self.dir.take() {
            if let Err(e) = dir.close() {
                swept.push(format!("remove the test directory: {e}"));
            }
        }
        swept
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let swept = self.teardown();
        if !swept.is_empty() {
            eprintln!("containerd harness: swept at teardown: {swept:?}");
        }
    }
}

/// The husk shim binary of this build tree.
pub fn shim_binary() -> PathBuf {
    crate::bin_dir().join("containerd-shim-husk-v2")
}
