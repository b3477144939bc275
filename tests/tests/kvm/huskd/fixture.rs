//! What every huskd lab test starts from and ends with: busybox in a local registry, the
//! host's netns list and leak snapshot taken before huskd starts, huskd itself, a client
//! with busybox pulled; at the end huskd stopped and the checks that nothing was left.
use std::path::PathBuf;
use std::time::Instant;

use husk_tests::containerd::images;
use husk_tests::huskd::{CriClient, Huskd, Registry};
use husk_tests::leaks::Snapshot;

use super::husk_netns;

pub struct Fixture {
    // Field order is drop order: a test that panics stops huskd (and its pods) before the
    // registry goes.
    pub huskd: Huskd,
    registry: Registry,
    /// busybox's reference in the local registry.
    pub image: String,
    pub netns_before: Vec<String>,
    vm_before: Snapshot,
    t0: Instant,
}

impl Fixture {
    pub fn start() -> Fixture {
        Fixture::start_with("")
    }

    /// As `start`, with `extra` appended to huskd's husk.toml.
    pub fn start_with(extra: &str) -> Fixture {
        Fixture::start_configured("", extra)
    }

    /// As `start`, with `huskd_keys` in huskd's `[huskd]` section and `extra` appended.
    pub fn start_configured(huskd_keys: &str, extra: &str) -> Fixture {
        husk_tests::require_kvm();
        let t0 = Instant::now();
        let registry = Registry::start();
        let image = registry.push_oci_archive(&images::busybox_archive(), "1", "husk/busybox");
        let netns_before = husk_netns();
        let vm_before = Snapshot::take();
        let huskd = Huskd::start_configured(&registry.host, huskd_keys, extra);
        let f = Fixture {
            huskd,
            registry,
            image,
            netns_before,
            vm_before,
            t0,
        };
        f.lap("huskd up, busybox in the local registry");
        f
    }

    /// Prints how long the test has run, and what it just did.
    pub fn lap(&self, what: &str) {
        eprintln!("[{:>6.1} s] {what}", self.t0.elapsed().as_secs_f64());
    }

    /// The pods' CRI log directory.
    pub fn log_dir(&self) -> PathBuf {
        self.huskd.dir.join("pod-logs")
    }

    /// A client of huskd with busybox pulled; busybox's image id.
    pub async fn client(&self) -> (CriClient, String) {
        let c = self.huskd.connect();
        let id = self.huskd.pull(&self.image).await;
        self.lap("busybox pulled");
        (c, id)
    }

    pub async fn remove_pod_and_assert_nothing_left(&self, c: &mut CriClient, pod: &str) {
        super::remove_pod_and_assert_nothing_left(c, &self.huskd, pod, &self.netns_before).await
    }

    /// Stops huskd and the registry, asserts that no VM, shim, tap, mount or cgroup of the
    /// test is left, and prints huskd's log.
    pub fn finish(mut self) {
        let log = self.huskd.log();
        self.huskd.stop();
        drop(self.registry);
        self.vm_before.assert_nothing_leaked();
        eprintln!("[{:>6.1} s] nothing left", self.t0.elapsed().as_secs_f64());
        eprintln!("--- huskd log ---\n{log}");
    }
}
