//! Our shim under a real containerd 1.6 with KVM (in the lab): `ctr run --runtime
//! io.containerd.husk.v2` runs a busybox container in a microVM and prints its output;
//! `--rm` leaves nothing behind.
use std::time::Duration;

use husk_tests::containerd::{images, Containerd};

#[test]
fn ctr_run_with_the_husk_runtime_prints_hi() {
    husk_tests::require_kvm();
    let shim = husk_tests::containerd::shim_binary();
    assert!(shim.is_file(), "{} is missing", shim.display());
    let c = Containerd::start();
    let before = c.host_state();
    let vm_before = husk_tests::leaks::Snapshot::take();
    let out = c.ctr_timeout(
        &[
            "run",
            "--rm",
            "--runtime",
            "io.containerd.husk.v2",
            images::BUSYBOX,
            "husk-hi",
            "echo",
            "hi",
        ],
        Duration::from_secs(300),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log = std::fs::read_to_string(c.dir().join("containerd.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "ctr run failed ({}): {stderr}\n--- containerd log ---\n{log}",
        out.status
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hi\n",
        "stderr: {stderr}"
    );
    before.assert_back_to(|| c.host_state());
    vm_before.assert_nothing_leaked();
    let swept = c.stop();
    assert!(swept.is_empty(), "the harness had to sweep: {swept:?}");
}
