//! huskd for the KVM tests: Debian's `docker-registry` on 127.0.0.1 holding the test busybox
//! image (pushed with skopeo from the containerd tests' OCI archive), and huskd from this
//! build with its own socket, state, data, CNI network (a test bridge) and the build tree's
//! VMM and guest images, all in a temp dir; a CRI client on its socket. The same shape as
//! `cri/tests/support` (which the host tests of huskd use).

pub use husk_cri::client::CriClient;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const READY: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("its address")
        .port()
}

fn stop(child: &mut Child, what: &str) {
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while matches!(child.try_wait(), Ok(None)) {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A plain-HTTP registry on 127.0.0.1.
pub struct Registry {
    pub host: String,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Registry {
        assert!(
            Path::new("/usr/bin/docker-registry").is_file(),
            "/usr/bin/docker-registry is missing: run scripts/setup"
        );
        let dir = tempfile::Builder::new()
            .prefix("husk-registry-")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("storage").display()
            ),
        )
        .expect("write the registry config");
        let log = dir.path().join("log");
        let out = std::fs::File::create(&log).expect("registry log");
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("start docker-registry");
        let r = Registry {
            host: format!("127.0.0.1:{port}"),
            child,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + READY;
        while std::net::TcpStream::connect(&r.host).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen: {}",
                std::fs::read_to_string(&r.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    /// Pushes an OCI image-layout archive's image `tag` as `<host>/<repo>:<tag>`; returns
    /// that reference.
    pub fn push_oci_archive(&self, archive: &Path, tag: &str, repo: &str) -> String {
        let reference = format!("{}/{repo}:{tag}", self.host);
        let out = Command::new("skopeo")
            .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
            .arg(format!("oci-archive:{}:{tag}", archive.display()))
            .arg(format!("docker://{reference}"))
            .output()
            .expect("run skopeo (Debian package skopeo)");
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        reference
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        stop(&mut self.child, "docker-registry");
    }
}

/// huskd from this build with everything under a temp dir in /tmp.
pub struct Huskd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// Its Prometheus endpoint (`GET /metrics`).
    pub metrics: std::net::SocketAddr,
    pub bridge: String,
    log: PathBuf,
    config: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Huskd {
    /// Starts huskd; `registry` is allowed over plain HTTP.
    pub fn start(registry: &str) -> Huskd {
        Huskd::start_with(registry, "")
    }

    /// Starts huskd with `extra` appended to its husk.toml (e.g. the shim's `[timeouts]`).
    pub fn start_with(registry: &str, extra: &str) -> Huskd {
        Huskd::start_configured(registry, "", extra)
    }

    /// Starts huskd with `huskd_keys` in its `[huskd]` section (e.g. `cgroup_driver`) and
    /// `extra` appended to its husk.toml.
    pub fn start_configured(registry: &str, huskd_keys: &str, extra: &str) -> Huskd {
        let huskd = crate::bin_dir().join("huskd");
        assert!(
            huskd.is_file(),
            "{} is missing: cargo build --workspace --bins",
            huskd.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("husk-huskd-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let p = dir.path().to_path_buf();
        let pid = std::process::id();
        let bridge = format!("hkd{}", pid % 1_000_000);
        let subnet = format!("10.242.{}.0/24", pid % 250);
        std::fs::create_dir_all(p.join("net.d")).expect("conf dir");
        std::fs::write(
            p.join("net.d/10-huskd-test.conflist"),
            format!(
                r#"{{"cniVersion":"1.0.0","name":"husk-huskd-test","plugins":[
                  {{"type":"bridge","bridge":"{bridge}","isGateway":true,"ipMasq":false,
                    "ipam":{{"type":"host-local","ranges":[[{{"subnet":"{subnet}"}}]],
                             "dataDir":"{}/ipam"}}}}]}}"#,
                p.display()
            ),
        )
        .expect("write the conflist");
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port for the metrics endpoint");
        let guest = crate::guest_dir();
        let config = p.join("husk.toml");
        std::fs::write(
            &config,
            format!(
                "vmm = \"{vmm}\"\nkernel = \"{kernel}\"\ninitramfs = \"{initramfs}\"\n\n\
                 [huskd]\nsocket = \"{d}/huskd.sock\"\nstate_dir = \"{d}/state\"\n\
                 data_dir = \"{d}/data\"\nmetrics_address = \"{metrics}\"\n\
                 registries = [{{ host = \"{registry}\", policy = \"allow-insecure\" }}]\n\
                 {huskd_keys}\n\n\
                 [huskd.cni]\nconf_dir = \"{d}/net.d\"\nbin_dirs = [\"/usr/lib/cni\"]\n{extra}",
                vmm = crate::bin_dir().join("husk-vmm").display(),
                kernel = guest.join("vmlinux").display(),
                initramfs = guest.join("husk-initramfs.cpio").display(),
                d = p.display(),
            ),
        )
        .expect("write husk.toml");
        let mut h = Huskd {
            socket: p.join("huskd.sock"),
            metrics,
            log: p.join("huskd.log"),
            dir: p,
            bridge,
            config,
            child: None,
            _dir: dir,
        };
        h.spawn();
        h
    }

    /// Starts huskd on this instance's config (its log appended to) and waits for its socket.
    fn spawn(&mut self) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("huskd log");
        let child = Command::new(crate::bin_dir().join("huskd"))
            .arg("--config")
            .arg(&self.config)
            .env("HUSK_LOG", "husk_cri=debug,info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("start huskd");
        self.child = Some(child);
        let h = self;
        let deadline = Instant::now() + READY;
        while std::os::unix::net::UnixStream::connect(&h.socket).is_err() {
            if let Some(Ok(Some(st))) = h.child.as_mut().map(Child::try_wait) {
                panic!("huskd exited ({st}): {}", h.log());
            }
            assert!(
                Instant::now() < deadline,
                "huskd did not come up: {}",
                h.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs huskd (a crash: no cleanup of its own runs) and starts it again on the same
    /// state; the socket of the dead one is removed first so readiness means the new one.
    pub fn kill_and_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
        self.spawn();
    }

    /// huskd's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The metrics endpoint's exposition text.
    pub fn scrape_metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.metrics).expect("connect to /metrics");
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: huskd\r\nConnection: close\r\n\r\n"
        )
        .expect("send GET /metrics");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read /metrics");
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn connect(&self) -> CriClient {
        husk_cri::client::connect(&self.socket)
    }

    /// Pulls `image` through huskd's CRI; its image ref (id).
    pub async fn pull(&self, image: &str) -> String {
        self.connect()
            .img
            .pull_image(k8s_cri::v1::PullImageRequest {
                image: Some(k8s_cri::v1::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("PullImage {image} through huskd: {e}\n{}", self.log()))
            .into_inner()
            .image_ref
    }

    /// Stops huskd (SIGTERM) and deletes the test bridge CNI made.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop(&mut c, "huskd");
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Huskd {
    fn drop(&mut self) {
        self.stop();
    }
}
