//! Four pods asked for at once (four RunPodSandbox calls in flight, each then a container):
//! all run, each with its own IP, and four concurrent Stop/Remove leave nothing behind.
use std::collections::BTreeSet;

use husk_tests::huskd::Huskd;
use k8s_cri::v1 as cri;

use super::{assert_nothing_left, container_config, pod_config, run_container, run_pod, Fixture};

const PODS: usize = 4;

/// One pod with one container; returns (pod id, container id, pod IP, what `hostname`
/// printed in the container).
async fn one_pod(huskd: &Huskd, image: &str, i: usize) -> (String, String, String, String) {
    let mut c = huskd.connect();
    let sandbox = pod_config(&format!("cpod{i}"), &huskd.dir.join("pod-logs"));
    let pod = run_pod(&mut c, huskd, &sandbox).await;
    let id = run_container(
        &mut c,
        huskd,
        &pod,
        container_config("main", image, &["sleep", "600"]),
        &sandbox,
    )
    .await;
    let ip =
        c.rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .network
        .unwrap()
        .ip;
    let r =
        c.rt.exec_sync(cri::ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec!["hostname".into()],
            timeout: 60,
        })
        .await
        .unwrap_or_else(|e| panic!("ExecSync in pod {i}: {e}"))
        .into_inner();
    (
        pod,
        id,
        ip,
        String::from_utf8_lossy(&r.stdout).trim().into(),
    )
}

async fn remove(huskd: &Huskd, pod: &str) {
    let mut c = huskd.connect();
    c.rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\nhuskd log:\n{}", huskd.log()));
    c.rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\nhuskd log:\n{}", huskd.log()));
}

#[test]
fn four_pods_started_concurrently_run_and_leave_nothing() {
    // Four nested VMs under TCG share the lab's one vCPU: an agent call can take more than
    // its default 30 s there.
    let f = Fixture::start_with("\n[timeouts]\nagent_call_secs = 180\n");
    let (huskd, image) = (&f.huskd, &f.image);
    let rt = husk_tests::pod::runtime();
    rt.block_on(async {
        let (mut c, _) = f.client().await;
        let h = huskd;
        let img = image.as_str();
        let (a, b, d, e) = tokio::join!(
            one_pod(h, img, 0),
            one_pod(h, img, 1),
            one_pod(h, img, 2),
            one_pod(h, img, 3)
        );
        let pods = [a, b, d, e];
        f.lap(&format!("{PODS} pods running"));
        for (i, (_, _, _, hostname)) in pods.iter().enumerate() {
            assert_eq!(hostname, &format!("cpod{i}"), "each pod is its own VM");
        }
        let ips: BTreeSet<&str> = pods.iter().map(|p| p.2.as_str()).collect();
        assert_eq!(ips.len(), PODS, "distinct IPs: {pods:?}");
        assert!(!ips.contains(""), "{pods:?}");
        let ready =
            c.rt.list_pod_sandbox(cri::ListPodSandboxRequest {
                filter: Some(cri::PodSandboxFilter {
                    state: Some(cri::PodSandboxStateValue {
                        state: cri::PodSandboxState::SandboxReady as i32,
                    }),
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .items;
        assert_eq!(ready.len(), PODS);
        let running =
            c.rt.list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter {
                    state: Some(cri::ContainerStateValue {
                        state: cri::ContainerState::ContainerRunning as i32,
                    }),
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .containers;
        let mut want: Vec<&str> = pods.iter().map(|p| p.1.as_str()).collect();
        let mut got: Vec<&str> = running.iter().map(|c| c.id.as_str()).collect();
        want.sort();
        got.sort();
        assert_eq!(got, want);

        tokio::join!(
            remove(h, &pods[0].0),
            remove(h, &pods[1].0),
            remove(h, &pods[2].0),
            remove(h, &pods[3].0)
        );
        assert_nothing_left(&mut c, huskd, &f.netns_before).await;
    });
    f.finish();
}
