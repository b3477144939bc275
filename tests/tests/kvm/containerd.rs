//! Our shim under a real containerd 1.6 with KVM (in the lab): `ctr run --runtime
//! io.containerd.husk.v2` runs a busybox container in a microVM and prints its output;
//! `--rm` leaves nothing behind.
use std::time::Duration;

use husk_tests::containerd::cri::wait_log_line;
use husk_tests::containerd::{images, Containerd};

/// The pod's host cgroup under its CRI cgroup parent.
mod cgroup;
/// OOM, a killed VMM or shim, stats/update/pause through CRI, cycles.
mod failure;
/// Pod networking: CNI IPs in the guests, pod-to-pod ping, a hostPort.
mod network;
/// `ctr run -t`.
mod tty;

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
    // The container's host cgroup (`/<namespace>/husk-hi` from ctr) went with it.
    let cgroups: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("husk-hi"))
        .filter(|p| p.exists())
        .collect();
    assert!(cgroups.is_empty(), "host cgroups left: {cgroups:?}");
    let swept = c.stop();
    assert!(swept.is_empty(), "the harness had to sweep: {swept:?}");
    // After stop: the CNI bridge of the first pod is gone only then.
    vm_before.assert_nothing_leaked();
}

/// A Kubernetes-style pod through containerd's CRI with the `kata` handler: the pause
/// container and two busybox containers share one microVM; a container's echo lands in its
/// CRI log; another's exit code 7 reaches ContainerStatus; ExecSync returns stdout, stderr
/// and the exit code; Stop + Remove leave nothing.
#[test]
fn cri_pod_with_the_kata_handler_logs_and_execs_in_one_vm() {
    husk_tests::require_kvm();
    let c = Containerd::start();
    let before = c.host_state();
    let vm_before = husk_tests::leaks::Snapshot::take();
    let rt = husk_tests::pod::runtime();
    rt.block_on(async {
        let mut cri = c.cri();
        let pod = c
            .run_pod(&mut cri, "vm-pod", husk_tests::containerd::HANDLER_KATA)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let vmms = vmm_count();
        assert_eq!(vmms, 1, "one husk-vmm for the pod");
        let id = cri
            .run_container(
                &pod,
                "echo",
                images::BUSYBOX,
                &[
                    "sh",
                    "-c",
                    "echo hello from the pod VM; uname -r; sleep 600",
                ],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(vmm_count(), 1, "the container joined the pod's VM");
        let log = pod.log_dir().join("echo.log");
        let lines = wait_log_line(&log, Duration::from_secs(60), |l| {
            l.stream == "stdout" && l.text == "hello from the pod VM"
        })
        .await;
        let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        wait_log_line(&log, Duration::from_secs(30), |l| {
            l.stream == "stdout" && l.text != "hello from the pod VM"
        })
        .await
        .iter()
        .filter(|l| l.text != "hello from the pod VM")
        .for_each(|l| {
            assert_ne!(
                l.text,
                host_kernel.trim(),
                "uname -r is the guest's: {lines:?}"
            )
        });

        // A second container in the same VM; its exit status reaches CRI (Wait and
        // TaskExit through the shim).
        let failing = cri
            .run_container(&pod, "fails", images::BUSYBOX, &["sh", "-c", "exit 7"])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            vmm_count(),
            1,
            "the second container joined the pod's VM too"
        );
        let st = cri
            .wait_exited(&failing, Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((st.exit_code, st.reason.as_str()), (7, "Error"), "{st:?}");

        let r = cri
            .exec_sync(&id, &["sh", "-c", "echo out; echo err >&2; exit 3"], 0)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(String::from_utf8_lossy(&r.stdout), "out\n");
        assert_eq!(String::from_utf8_lossy(&r.stderr), "err\n");
        assert_eq!(r.exit_code, 3);

        // A timed-out ExecSync returns: containerd kills the exec in the guest and waits
        // for EOF on its FIFOs, which the shim closes once the output is drained.
        let t = std::time::Instant::now();
        let r = cri.exec_sync(&id, &["sleep", "600"], 2).await;
        let took = t.elapsed();
        assert!(
            took < Duration::from_secs(30),
            "ExecSync timeout took {took:?}: {r:?}"
        );
        assert!(
            took >= Duration::from_secs(2),
            "ExecSync returned early: {r:?}"
        );
        if let Ok(r) = &r {
            assert_ne!(r.exit_code, 0, "a killed exec reports failure: {r:?}");
        }
        let pids = cri
            .exec_sync(
                &id,
                &["sh", "-c", "cat /proc/[0-9]*/comm | grep -cx sleep"],
                0,
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // The container's own `sleep 600` is the one left; the exec's was killed.
        assert_eq!(
            String::from_utf8_lossy(&pids.stdout).trim(),
            "1",
            "{pids:?}"
        );

        cri.stop_remove_pod(&pod.id)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    });
    before.assert_back_to(|| c.host_state());
    let swept = c.stop();
    assert!(swept.is_empty(), "the harness had to sweep: {swept:?}");
    // After stop: the CNI bridge of the first pod is gone only then.
    vm_before.assert_nothing_leaked();
}

/// Pids of husk-vmm processes that are not a husk-vmm's child (the VMM forks a helper
/// that removes its socket files when it ends).
pub(crate) fn vmm_pids() -> Vec<u32> {
    let comm = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let ppid = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().nth(1))
                    .map(String::from)
            })
            .unwrap_or_default()
    };
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|pid| comm(pid).trim() == "husk-vmm" && comm(&ppid(pid)).trim() != "husk-vmm")
        .filter_map(|pid| pid.parse().ok())
        .collect()
}

fn vmm_count() -> usize {
    vmm_pids().len()
}
