//! The shim's task events reach huskd's events socket: a container whose init the OOM
//! killer ends in the guest (its memory limit set at CreateContainer, as kubelet sets it)
//! is reported with reason `OOMKilled` and exit code 137, as containerd reports it; one that
//! exits by itself is `Completed`. huskd counted the events the shim forwarded.
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;

use super::{container_config, pod_config, run_container, run_pod, status, wait_exited, Fixture};

fn events_total(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("huskd_shim_events_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no huskd_shim_events_total in:\n{metrics}"))
}

#[test]
fn an_oom_killed_container_is_reported_oomkilled_through_the_shims_events() {
    let f = Fixture::start();
    let (huskd, image) = (&f.huskd, &f.image);
    let rt = husk_tests::pod::runtime();
    rt.block_on(async {
        let (mut c, _) = f.client().await;
        let sandbox = pod_config("oompod", &f.log_dir());
        let pod = run_pod(&mut c, huskd, &sandbox).await;
        let before = events_total(&huskd.scrape_metrics());
        f.lap("pod up");

        // dd's 64 MiB buffer in a 16 MiB cgroup: the OOM killer ends it, sh exits 137.
        let mut hog = container_config(
            "hog",
            image,
            &[
                "sh",
                "-c",
                "cat /sys/fs/cgroup/memory.max; dd if=/dev/zero of=/dev/null bs=64M count=1",
            ],
        );
        hog.linux = Some(cri::LinuxContainerConfig {
            resources: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 16 << 20,
                ..Default::default()
            }),
            ..Default::default()
        });
        let id = run_container(&mut c, huskd, &pod, hog, &sandbox).await;
        let st = wait_exited(&mut c, &id, Duration::from_secs(120)).await;
        assert_eq!(st.exit_code, 137, "{st:?}");
        // The exit (Wait or its event) can be recorded before the OOM event arrives.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut st = st;
        while st.reason != "OOMKilled" && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            st = status(&mut c, &id).await.expect("ContainerStatus");
        }
        assert_eq!(
            st.reason,
            "OOMKilled",
            "{st:?}\nhuskd log:\n{}",
            huskd.log()
        );
        let log = std::fs::read_to_string(f.log_dir().join("hog/0.log")).unwrap_or_default();
        assert!(
            log.contains(" stdout F 16777216"),
            "the limit is not the container's: {log}"
        );
        f.lap("hog OOMKilled");

        let done = run_container(
            &mut c,
            huskd,
            &pod,
            container_config("done", image, &["true"]),
            &sandbox,
        )
        .await;
        let st = wait_exited(&mut c, &done, Duration::from_secs(60)).await;
        assert_eq!(
            (st.exit_code, st.reason.as_str()),
            (0, "Completed"),
            "{st:?}"
        );
        // create, start, oom and exit of the hog at least; create, start, exit of the other.
        let after = events_total(&huskd.scrape_metrics());
        assert!(
            after >= before + 7,
            "the shim forwarded {} events",
            after - before
        );
        f.remove_pod_and_assert_nothing_left(&mut c, &pod).await;
    });
    f.finish();
}
