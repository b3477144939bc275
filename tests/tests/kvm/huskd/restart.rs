//! huskd SIGKILLed with a pod and a container running, then started again on the same
//! state: the pod and the container are still there and still run (the shim and the VM
//! never noticed), the container's output still reaches its CRI log, its exit is still
//! seen, and Stop/Remove of the pod then clean up everything the first huskd made. And
//! huskd SIGKILLed in the middle of a RunPodSandbox: the next huskd undoes that pod.
use std::time::Duration;

use husk_tests::containerd::cri::wait_log_line;
use k8s_cri::v1 as cri;

use super::{container_config, pod_config, run_container, run_pod, status, Fixture};

async fn pod_status(c: &mut husk_tests::huskd::CriClient, pod: &str) -> cri::PodSandboxStatus {
    c.rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
        pod_sandbox_id: pod.into(),
        verbose: false,
    })
    .await
    .expect("PodSandboxStatus")
    .into_inner()
    .status
    .expect("a status")
}

#[test]
fn a_running_pod_survives_a_huskd_restart() {
    let mut f = Fixture::start();
    let rt = husk_tests::pod::runtime();
    rt.block_on(async {
        let (mut c, _) = f.client().await;
        let log_dir = f.log_dir();
        let sandbox = pod_config("rpod", &log_dir);
        let pod = run_pod(&mut c, &f.huskd, &sandbox).await;
        let before = pod_status(&mut c, &pod).await;
        let ip = before.network.clone().unwrap().ip;
        assert!(!ip.is_empty());
        let id = run_container(
            &mut c,
            &f.huskd,
            &pod,
            container_config("main", &f.image, &["sh", "-c", "echo before; sleep 600"]),
            &sandbox,
        )
        .await;
        let log = log_dir.join("main/0.log");
        wait_log_line(&log, Duration::from_secs(60), |l| l.text == "before").await;
        let started = status(&mut c, &id).await.unwrap();
        f.lap("pod and container running");

        f.huskd.kill_and_restart();
        f.lap("huskd killed and restarted");
        let mut c = f.huskd.connect();

        // The pod: listed, Ready, same IP and creation time.
        let items =
            c.rt.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
                .await
                .unwrap()
                .into_inner()
                .items;
        assert_eq!(
            items.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            [pod.as_str()],
            "huskd log:\n{}",
            f.huskd.log()
        );
        let after = pod_status(&mut c, &pod).await;
        assert_eq!(after.state, cri::PodSandboxState::SandboxReady as i32);
        assert_eq!(after.network.unwrap().ip, ip);
        assert_eq!(after.created_at, before.created_at);
        assert_eq!(after.metadata, before.metadata);

        // The container: listed, Running, as before.
        let listed =
            c.rt.list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter {
                    pod_sandbox_id: pod.clone(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .containers;
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].id, id);
        assert_eq!(
            listed[0].state,
            cri::ContainerState::ContainerRunning as i32
        );
        let st = status(&mut c, &id).await.unwrap();
        assert_eq!(st.state, cri::ContainerState::ContainerRunning as i32);
        assert_eq!(st.started_at, started.started_at);
        assert_eq!(st.log_path, started.log_path);

        // It still runs commands, and its output still reaches the log (the new huskd
        // reads the FIFOs the shim kept open).
        let r =
            c.rt.exec_sync(cri::ExecSyncRequest {
                container_id: id.clone(),
                cmd: ["sh", "-c", "echo after > /proc/1/fd/1; echo ok"]
                    .map(String::from)
                    .to_vec(),
                timeout: 30,
            })
            .await
            .unwrap_or_else(|e| panic!("ExecSync: {e}\nhuskd log:\n{}", f.huskd.log()))
            .into_inner();
        assert_eq!((r.exit_code, r.stdout.as_slice()), (0, &b"ok\n"[..]));
        wait_log_line(&log, Duration::from_secs(30), |l| l.text == "after").await;
        f.lap("exec and log work after the restart");

        // Its exit is seen: the new huskd waits on the shim again.
        c.rt.stop_container(cri::StopContainerRequest {
            container_id: id.clone(),
            timeout: 0,
        })
        .await
        .unwrap_or_else(|e| panic!("StopContainer: {e}\nhuskd log:\n{}", f.huskd.log()));
        let st = status(&mut c, &id).await.unwrap();
        assert_eq!(st.state, cri::ContainerState::ContainerExited as i32);
        assert_eq!((st.exit_code, st.reason.as_str()), (137, "Error"), "{st:?}");

        // A second restart with the container exited: still recorded as exited.
        f.huskd.kill_and_restart();
        let mut c = f.huskd.connect();
        let st = status(&mut c, &id).await.unwrap();
        assert_eq!(
            (st.state, st.exit_code),
            (cri::ContainerState::ContainerExited as i32, 137)
        );

        f.remove_pod_and_assert_nothing_left(&mut c, &pod).await;
        f.lap("pod removed by the restarted huskd; nothing left");
    });
    f.finish();
}

/// huskd SIGKILLed while RunPodSandbox is starting the pod's shim and VM: the caller gets
/// an error, and the restarted huskd undoes the pod from its record before it serves (the
/// shim and its VM, the CNI allocation, the netns, the bundle, the record): nothing listed,
/// nothing left.
#[test]
fn a_pod_cut_short_by_a_huskd_crash_is_undone_at_the_next_start() {
    let mut f = Fixture::start();
    let rt = husk_tests::pod::runtime();
    rt.block_on(async {
        let (mut c, _) = f.client().await;
        let sandbox = pod_config("cutpod", &f.log_dir());
        let call = tokio::spawn(async move {
            c.rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(sandbox),
                runtime_handler: "kata".into(),
            })
            .await
        });
        // The shim is up (its VM booting): huskd has made the netns, CNI and bundle.
        let needle = f.huskd.socket.display().to_string();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while super::processes_with(&needle).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "no shim started in 120 s:\n{}",
                f.huskd.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_ne!(super::husk_netns(), f.netns_before, "no netns made yet");
        f.huskd.kill_and_restart();
        let r = call.await.expect("the RunPodSandbox task");
        assert!(
            r.is_err(),
            "RunPodSandbox answered through a killed huskd: {r:?}"
        );
        f.lap("huskd killed during RunPodSandbox and restarted");
        assert!(
            f.huskd.log().contains("RunPodSandbox was cut short"),
            "{}",
            f.huskd.log()
        );
        super::assert_nothing_left(&mut f.huskd.connect(), &f.huskd, &f.netns_before).await;
    });
    f.finish();
}
