//! The control API of a real husk-vmm process (no VM is started, so any host runs this).
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_vmm_api::{request, BlockConfig, Request};

struct Vmm(Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(sock: &Path) -> Vmm {
    let child = Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
        .arg("--api-sock")
        .arg(sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start husk-vmm");
    let vmm = Vmm(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no API socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    vmm
}

/// Devices beyond the VM's interrupt lines are refused when added, not at start: a client
/// cannot make the VMM hold an unbounded number of configs (and tap fds).
#[test]
fn devices_past_the_interrupt_lines_are_refused_when_added() {
    let dir = tempfile_dir();
    let sock = dir.join("api.sock");
    let _vmm = serve(&sock);
    let disk = |i: usize| {
        Request::AddBlock(BlockConfig {
            rate_limiter: None,
            path: dir.join(format!("disk{i}")),
            read_only: false,
            id: None,
        })
    };
    let mut accepted = 0;
    let refused = loop {
        let resp = request(&sock, &disk(accepted), &[]).expect("API round trip");
        if !resp.ok {
            break resp.error.unwrap_or_default();
        }
        accepted += 1;
        assert!(accepted < 100, "no limit on devices");
    };
    // 19 interrupt lines, one taken by the rng.
    assert_eq!(accepted, 18, "{refused}");
    assert!(refused.contains("at most 19 devices"), "{refused}");
    std::fs::remove_dir_all(dir).unwrap();
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("husk-vmm-api-limits-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
