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
    if let Err(e) = vmm::check::check_host() {
        panic!("this test needs a usable KVM and cannot run here: {e}");
    }
}

/// Where the workspace's host binaries are (`cargo build --workspace --bins`).
pub fn bin_dir() -> PathBuf {
    std::env::var_os("HUSK_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/debug"))
}

pub mod vmm_proc {
    //! Runs husk-vmm as a child process and collects what it printed.
    use std::io::Read;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    pub struct Output {
        pub code: Option<i32>,
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
                    self.code, self.stdout, self.stderr
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
        let code = loop {
            if let Some(st) = child.try_wait().expect("wait for husk-vmm") {
                break st.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Output {
            code,
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
