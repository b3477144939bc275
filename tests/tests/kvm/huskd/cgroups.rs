//! kubelet's cgroup parent with huskd's systemd driver (no systemd runs here: the shim makes
//! the directories systemd would): a pod whose parent is `<x>-pod1.slice` gets its shim,
//! husk-vmm and virtiofsd in `<x>.slice/<x>-pod1.slice/husk-<pod id>.scope`; a parent in the
//! cgroupfs form is InvalidArgument naming the driver, with nothing made; the scope goes
//! with the pod.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;

use super::{pod_config, run_pod, Fixture};

/// The names (`comm`) of the processes in cgroup `dir`.
fn process_names(dir: &Path) -> Vec<String> {
    let procs = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_else(|e| panic!("{}/cgroup.procs: {e}", dir.display()));
    let mut names: Vec<String> = procs
        .lines()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).ok())
        .map(|c| c.trim().to_string())
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn the_systemd_driver_puts_the_pods_host_processes_in_its_scope() {
    let f = Fixture::start_configured("cgroup_driver = \"systemd\"", "");
    let stem = format!("husktest{}", std::process::id());
    let slices = PathBuf::from("/sys/fs/cgroup").join(format!("{stem}.slice"));
    let rt = husk_tests::pod::runtime();
    let scope = rt.block_on(async {
        let mut c = f.huskd.connect();
        let cfg =
            c.rt.runtime_config(cri::RuntimeConfigRequest {})
                .await
                .expect("RuntimeConfig")
                .into_inner();
        assert_eq!(
            cfg.linux.map(|l| l.cgroup_driver),
            Some(cri::CgroupDriver::Systemd as i32)
        );
        // The cgroupfs form under the systemd driver: refused before anything is made.
        let mut wrong = pod_config("cgwrong", &f.log_dir());
        wrong.linux = Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: "/kubepods/burstable/pod1".into(),
            ..Default::default()
        });
        let e =
            c.rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(wrong),
                runtime_handler: "kata".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("cgroup-driver"), "{e:?}");
        super::assert_nothing_left(&mut c, &f.huskd, &f.netns_before).await;

        let mut sandbox = pod_config("cgpod", &f.log_dir());
        sandbox.linux = Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: format!("{stem}-pod1.slice"),
            ..Default::default()
        });
        let pod = run_pod(&mut c, &f.huskd, &sandbox).await;
        let scope = slices
            .join(format!("{stem}-pod1.slice"))
            .join(format!("husk-{pod}.scope"));
        let names = process_names(&scope);
        for want in ["containerd-shim", "husk-vmm", "virtiofsd"] {
            assert!(
                names.iter().any(|n| n.starts_with(want)),
                "no {want} in {}: {names:?}",
                scope.display()
            );
        }
        f.lap("the pod's shim, VMM and virtiofsd are in its systemd-form scope");
        f.remove_pod_and_assert_nothing_left(&mut c, &pod).await;
        scope
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    while scope.exists() {
        assert!(
            Instant::now() < deadline,
            "{} outlived the pod",
            scope.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The slices are kubelet's (systemd's) to remove; the test made them through the pod.
    let _ = std::fs::remove_dir(slices.join(format!("{stem}-pod1.slice")));
    let _ = std::fs::remove_dir(&slices);
    f.finish();
}
