//! The calls on a live container: ContainerStats / ListContainerStats / PodSandboxStats /
//! ListPodSandboxStats (CPU and memory from the container's cgroup in the guest, filters),
//! UpdateContainerResources (a memory limit reaches that cgroup: the stats then show it)
//! and ReopenContainerLog (kubelet's rotation: rename, reopen, new output in a new file).
use std::time::Duration;

use husk_tests::containerd::cri::{parse_log, wait_log_line};
use husk_tests::huskd::CriClient;
use k8s_cri::v1 as cri;
use tonic::Code;

use super::{container_config, pod_config, run_container, run_pod, Fixture};

async fn container_stats(
    c: &mut CriClient,
    id: &str,
) -> Result<cri::ContainerStats, tonic::Status> {
    c.rt.container_stats(cri::ContainerStatsRequest {
        container_id: id.into(),
    })
    .await
    .map(|r| r.into_inner().stats.expect("stats"))
}

async fn list_stats(c: &mut CriClient, f: cri::ContainerStatsFilter) -> Vec<String> {
    c.rt.list_container_stats(cri::ListContainerStatsRequest { filter: Some(f) })
        .await
        .expect("ListContainerStats")
        .into_inner()
        .stats
        .into_iter()
        .map(|s| s.attributes.unwrap().id)
        .collect()
}

async fn list_pod_stats(
    c: &mut CriClient,
    f: cri::PodSandboxStatsFilter,
) -> Vec<cri::PodSandboxStats> {
    c.rt.list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest { filter: Some(f) })
        .await
        .expect("ListPodSandboxStats")
        .into_inner()
        .stats
}

fn value(v: &Option<cri::UInt64Value>) -> u64 {
    v.as_ref().map_or(0, |v| v.value)
}

#[test]
fn stats_resources_and_log_reopen_on_a_live_container() {
    let f = Fixture::start();
    let (huskd, image) = (&f.huskd, &f.image);
    let rt = husk_tests::pod::runtime();
    rt.block_on(async {
        let (mut c, _) = f.client().await;
        let log_dir = f.log_dir();
        let sandbox = pod_config("lpod", &log_dir);
        let pod = run_pod(&mut c, huskd, &sandbox).await;
        // A line every 0.1 s, numbered; some CPU and memory of its own.
        let id = run_container(
            &mut c,
            huskd,
            &pod,
            container_config(
                "ticker",
                image,
                &[
                    "sh",
                    "-c",
                    "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.1; done",
                ],
            ),
            &sandbox,
        )
        .await;
        let log = log_dir.join("ticker/0.log");
        wait_log_line(&log, Duration::from_secs(60), |l| {
            l.text.starts_with("tick")
        })
        .await;
        f.lap("container running");

        // ContainerStats: CPU and memory of the running container, with timestamps.
        let s = container_stats(&mut c, &id)
            .await
            .unwrap_or_else(|e| panic!("ContainerStats: {e}\nhuskd log:\n{}", huskd.log()));
        assert_eq!(s.attributes.as_ref().unwrap().id, id);
        assert_eq!(
            s.attributes
                .as_ref()
                .unwrap()
                .metadata
                .as_ref()
                .unwrap()
                .name,
            "ticker"
        );
        let cpu = s.cpu.expect("cpu stats");
        let mem = s.memory.expect("memory stats");
        assert!(cpu.timestamp > 0 && mem.timestamp > 0, "{s:?}");
        assert!(value(&cpu.usage_core_nano_seconds) > 0, "{s:?}");
        assert!(value(&mem.working_set_bytes) > 0, "{s:?}");
        assert!(s.writable_layer.is_some(), "{s:?}");
        // A second sample has a rate.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s2 = container_stats(&mut c, &id).await.unwrap();
        let cpu2 = s2.cpu.unwrap();
        assert!(cpu2.timestamp > cpu.timestamp);
        assert!(value(&cpu2.usage_core_nano_seconds) >= value(&cpu.usage_core_nano_seconds));
        assert!(cpu2.usage_nano_cores.is_some(), "a rate from two samples");
        let e = container_stats(&mut c, "no-such").await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");

        // Filters: pod id, id, labels.
        let by_pod = cri::ContainerStatsFilter {
            pod_sandbox_id: pod.clone(),
            ..Default::default()
        };
        assert_eq!(list_stats(&mut c, by_pod).await, std::slice::from_ref(&id));
        let by_id = cri::ContainerStatsFilter {
            id: id.clone(),
            ..Default::default()
        };
        assert_eq!(list_stats(&mut c, by_id).await, std::slice::from_ref(&id));
        let by_label = cri::ContainerStatsFilter {
            label_selector: [("c".to_string(), "other".to_string())].into(),
            ..Default::default()
        };
        assert!(list_stats(&mut c, by_label).await.is_empty());
        let other_pod = cri::ContainerStatsFilter {
            pod_sandbox_id: "other".into(),
            ..Default::default()
        };
        assert!(list_stats(&mut c, other_pod).await.is_empty());

        // Pod stats: its container inside, CPU and memory summed.
        let ps =
            c.rt.pod_sandbox_stats(cri::PodSandboxStatsRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("PodSandboxStats: {e}"))
            .into_inner()
            .stats
            .unwrap();
        assert_eq!(ps.attributes.as_ref().unwrap().id, pod);
        let linux = ps.linux.unwrap();
        assert_eq!(linux.containers.len(), 1);
        assert!(value(&linux.cpu.unwrap().usage_core_nano_seconds) > 0);
        assert!(value(&linux.memory.unwrap().working_set_bytes) > 0);
        let e =
            c.rt.pod_sandbox_stats(cri::PodSandboxStatsRequest {
                pod_sandbox_id: "no-such".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        let by_label = cri::PodSandboxStatsFilter {
            label_selector: [("app".to_string(), "lpod".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(list_pod_stats(&mut c, by_label).await.len(), 1);
        let by_other = cri::PodSandboxStatsFilter {
            id: "other".into(),
            ..Default::default()
        };
        assert!(list_pod_stats(&mut c, by_other).await.is_empty());
        f.lap("stats");

        // UpdateContainerResources: a 64 MiB memory limit lands in the guest cgroup (the
        // stats' available bytes are counted against it).
        let limit: u64 = 64 << 20;
        c.rt.update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: id.clone(),
            linux: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: limit as i64,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("UpdateContainerResources: {e}\nhuskd log:\n{}", huskd.log()));
        let mem = container_stats(&mut c, &id).await.unwrap().memory.unwrap();
        let (usage, available) = (
            value(&mem.usage_bytes),
            mem.available_bytes.map(|v| v.value),
        );
        assert!(
            available.is_some_and(|a| a + usage == limit),
            "usage {usage}, available {available:?}"
        );
        for (req, code) in [
            (
                cri::UpdateContainerResourcesRequest {
                    container_id: "no-such".into(),
                    linux: Some(Default::default()),
                    ..Default::default()
                },
                Code::NotFound,
            ),
            (
                cri::UpdateContainerResourcesRequest {
                    container_id: id.clone(),
                    ..Default::default()
                },
                Code::InvalidArgument,
            ),
        ] {
            let e = c.rt.update_container_resources(req).await.unwrap_err();
            assert_eq!(e.code(), code, "{e:?}");
        }
        f.lap("resources updated");

        // ReopenContainerLog: rotate the log the way kubelet does.
        let rotated = log_dir.join("ticker/0.log.20260101-000000");
        std::fs::rename(&log, &rotated).unwrap();
        c.rt.reopen_container_log(cri::ReopenContainerLogRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("ReopenContainerLog: {e}\nhuskd log:\n{}", huskd.log()));
        assert!(log.is_file(), "the new log exists when the call returns");
        let old_len = std::fs::metadata(&rotated).unwrap().len();
        let new = wait_log_line(&log, Duration::from_secs(30), |l| {
            l.text.starts_with("tick")
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            std::fs::metadata(&rotated).unwrap().len(),
            old_len,
            "the rotated log got writes after the reopen"
        );
        // The numbering goes on across the two files, nothing lost or repeated.
        let n = |l: &husk_tests::containerd::cri::LogLine| -> u64 {
            l.text
                .strip_prefix("tick ")
                .and_then(|n| n.parse().ok())
                .unwrap()
        };
        let old = parse_log(&std::fs::read_to_string(&rotated).unwrap());
        assert_eq!(n(&new[0]), n(old.last().unwrap()) + 1, "{old:?} / {new:?}");
        let e =
            c.rt.reopen_container_log(cri::ReopenContainerLogRequest {
                container_id: "no-such".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        f.lap("log reopened");

        f.remove_pod_and_assert_nothing_left(&mut c, &pod).await;
    });
    f.finish();
}
