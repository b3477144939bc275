//! Host cgroups through containerd's CRI with the `kata` handler: a pod whose
//! LinuxPodSandboxConfig has a `cgroup_parent` gets its shim, husk-vmm and virtiofsd in the
//! sandbox's cgroup `<cgroup_parent>/<sandbox id>` (cgroupfs driver), with its memory
//! counted there; Stop + Remove take the cgroup away and leave nothing else.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_tests::containerd::{Containerd, HANDLER_KATA};
use husk_tests::leaks::Snapshot;

/// The cgroup v2 path (from the hierarchy's root) of process `pid`.
fn cgroup_of(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/cgroup: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("process {pid} has no cgroup v2 line: {text}"))
        .to_string()
}

fn pids_named(prefix: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim().starts_with(prefix))
        })
        .collect()
}

#[test]
fn the_shim_vmm_and_virtiofsd_run_in_the_pods_cgroup_under_its_parent() {
    husk_tests::require_kvm();
    let c = Containerd::start();
    let before = c.host_state();
    let vm_before = Snapshot::take();
    let cgroup_dir = husk_tests::pod::runtime().block_on(async {
        let mut cri = c.cri();
        let pod = c
            .run_pod(&mut cri, "cg-pod", HANDLER_KATA)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let want = format!("{}/{}", c.cgroup_parent(), pod.id);
        let dir = PathBuf::from("/sys/fs/cgroup").join(want.trim_start_matches('/'));
        assert!(dir.is_dir(), "{} is missing", dir.display());

        let shims: Vec<u32> = c
            .host_state()
            .shims
            .iter()
            .filter_map(|s| s.rsplit_once('[')?.1.strip_suffix(']')?.parse().ok())
            .collect();
        let vmms = super::vmm_pids();
        let virtiofsds = pids_named("virtiofsd");
        assert_eq!(shims.len(), 1, "one shim: {shims:?}");
        assert_eq!(vmms.len(), 1, "one husk-vmm: {vmms:?}");
        assert!(!virtiofsds.is_empty(), "a virtiofsd for the pod's share");
        for (what, pid) in shims
            .iter()
            .map(|p| ("shim", *p))
            .chain(vmms.iter().map(|p| ("husk-vmm", *p)))
            .chain(virtiofsds.iter().map(|p| ("virtiofsd", *p)))
        {
            assert_eq!(
                cgroup_of(pid),
                want,
                "{what} [{pid}] is not in the pod's cgroup"
            );
        }
        // The pod's overhead is accounted there: its ancestors enabled the memory
        // controller for it, and the VMM's guest memory counts.
        let current: u64 = std::fs::read_to_string(dir.join("memory.current"))
            .unwrap_or_else(|e| panic!("{}/memory.current: {e}", dir.display()))
            .trim()
            .parse()
            .unwrap();
        assert!(
            current > 4 << 20,
            "the pod's cgroup accounts only {current} bytes"
        );

        cri.stop_remove_pod(&pod.id)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        dir
    });
    // The shim tears the VM down and removes the cgroup as it goes (Shutdown is
    // asynchronous to RemovePodSandbox).
    let deadline = Instant::now() + Duration::from_secs(15);
    while Path::new(&cgroup_dir).exists() {
        assert!(
            Instant::now() < deadline,
            "{} still there 15 s after RemovePodSandbox",
            cgroup_dir.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    before.assert_back_to(|| c.host_state());
    let swept = c.stop();
    assert!(swept.is_empty(), "the harness had to sweep: {swept:?}");
    vm_before.assert_nothing_leaked();
}
