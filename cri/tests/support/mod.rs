//! Real parts for huskd's tests, started by the tests themselves: Debian's
//! `docker-registry` on 127.0.0.1 with its own storage, and huskd itself (this build's
//! binary) with its own socket, state and data dirs; a CRI client on huskd's socket.
//! Dropping each stops its process and checks it went.

#![allow(dead_code)]

pub use husk_cri::client::CriClient;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const READY: Duration = Duration::from_secs(20);

/// `GET path` over plain HTTP/1.1 on `addr`, as Prometheus scrapes; the status line and
/// the body.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: huskd\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The value of the metrics sample named exactly `name` (with its labels).
pub fn sample(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{body}"))
}

pub fn require(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: run scripts/setup (Debian package {package})"
    );
}

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
    let deadline = Instant::now() + Duration::from_secs(10);
    while matches!(child.try_wait(), Ok(None)) {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A plain-HTTP registry on 127.0.0.1 (Debian's docker-registry 2.8).
pub struct Registry {
    pub host: String,
    pub storage: PathBuf,
    log: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Registry {
        require("/usr/bin/docker-registry", "docker-registry");
        let dir = tempfile::Builder::new()
            .prefix("husk-registry-")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let storage = dir.path().join("storage");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                storage.display()
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
            storage,
            log,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + READY;
        while std::net::TcpStream::connect(&r.host).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on {}: {}",
                r.host,
                r.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many blob downloads (GET .../blobs/...) the registry has served.
    pub fn blob_gets(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
            .count()
    }

    /// The file in the registry's storage that holds a blob.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        stop(&mut self.child, "docker-registry");
    }
}

/// huskd from this build, with everything under a temp dir.
pub struct Huskd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub data: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Huskd {
    /// Starts huskd with `extra` appended to its `[huskd]` section.
    pub fn start(extra: &str) -> Huskd {
        Huskd::start_with("", extra, |_| {})
    }

    /// Starts huskd with `top` as the file's top level (the shim's keys), `extra` in the
    /// `[huskd]` section, after `prepare` has seen the directory. Unless `top` names an
    /// initramfs, the one named is absent: no built-in image, so the store holds exactly
    /// what a test pulls.
    pub fn start_with(top: &str, extra: &str, prepare: impl FnOnce(&Path)) -> Huskd {
        let dir = tempfile::Builder::new()
            .prefix("husk-huskd-")
            .tempdir()
            .expect("temp dir");
        let p = dir.path().to_path_buf();
        let config = p.join("husk.toml");
        std::fs::create_dir_all(p.join("net.d")).expect("conf dir");
        prepare(&p);
        let top = if top.contains("initramfs") {
            top.to_string()
        } else {
            format!("{top}\ninitramfs = \"{}/absent.cpio\"", p.display())
        };
        std::fs::write(
            &config,
            format!(
                "{top}\n[huskd]\nsocket = \"{0}/huskd.sock\"\nstate_dir = \"{0}/state\"\n\
                 data_dir = \"{0}/data\"\n{extra}\n[huskd.cni]\nconf_dir = \"{0}/net.d\"\n",
                p.display()
            ),
        )
        .expect("write husk.toml");
        let mut h = Huskd {
            socket: p.join("huskd.sock"),
            data: p.join("data"),
            log: p.join("huskd.log"),
            config,
            dir: p,
            child: None,
            _dir: dir,
        };
        h.spawn();
        h
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("huskd log");
        let child = Command::new(env!("CARGO_BIN_EXE_huskd"))
            .arg("--config")
            .arg(&self.config)
            .env("HUSK_LOG", "husk_cri=debug,info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start huskd");
        self.child = Some(child);
        let deadline = Instant::now() + READY;
        // A crashed huskd leaves its socket file behind: ready means something accepts.
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                panic!("huskd exited ({st}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "huskd did not come up: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops huskd (SIGTERM) and starts it again on the same dirs.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Kills huskd with SIGKILL (a crash) and starts it again.
    pub fn crash_restart(&mut self) {
        let mut c = self.child.take().expect("huskd running");
        c.kill().expect("kill huskd");
        c.wait().expect("reap huskd");
        self.spawn();
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop(&mut c, "huskd");
            assert!(!self.socket.exists(), "huskd left its socket behind");
        }
    }

    pub fn connect(&self) -> CriClient {
        husk_cri::client::connect(&self.socket)
    }
}

impl Drop for Huskd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop(&mut c, "huskd");
        }
    }
}
