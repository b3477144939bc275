//! husk-bench-stream: huskd's streaming paths against one pod, timed. Run it where KVM works
//! (inside the lab: `HUSK_BIN_DIR=$PWD/target/release tests/lab/run --
//! target/release/husk-bench-stream`).
//!
//! - exec round trip: CRI `Exec` of `true` → the URL → SPDY upgrade and the error, stdout
//!   and stderr streams → the exit status on the error stream. Beside it `ExecSync` of the
//!   same command. Median of `--runs` (default 20) each, alternating.
//! - port-forward throughput: 64 MiB of zeros from busybox `nc` in the pod through one
//!   forwarded connection (CRI `PortForward` URL, SPDY, huskd, hybrid vsock, the agent,
//!   the pod's loopback), from opening the streams to the data stream's end. Median of 3.
//!
//! The client is husk's own minimal SPDY client (`husk_tests::spdy_client`, on huskd's
//! frame codec): a node client's start-up would dominate a round trip.
use husk_tests::bench::{median, ms};
use std::time::{Duration, Instant};

use husk_tests::containerd::images;
use husk_tests::huskd::{CriClient, Huskd, Registry};
use husk_tests::spdy_client;
use k8s_cri::v1 as cri;

const BYTES: u64 = 64 << 20;
const PORT: u16 = 9000;

async fn exec_streaming(c: &mut CriClient, id: &str) -> Duration {
    let t = Instant::now();
    let url =
        c.rt.exec(cri::ExecRequest {
            container_id: id.into(),
            cmd: vec!["true".into()],
            stdout: true,
            stderr: true,
            ..Default::default()
        })
        .await
        .expect("Exec")
        .into_inner()
        .url;
    let (status, _, _) = spdy_client::exec(&url).await.expect("exec over SPDY");
    let took = t.elapsed();
    assert!(status.contains("Success"), "exit status: {status}");
    took
}

async fn exec_sync(c: &mut CriClient, id: &str) -> Duration {
    let t = Instant::now();
    let r =
        c.rt.exec_sync(cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: vec!["true".into()],
            timeout: 60,
        })
        .await
        .expect("ExecSync")
        .into_inner();
    let took = t.elapsed();
    assert_eq!(r.exit_code, 0);
    took
}

async fn download(c: &mut CriClient, pod: &str) -> Duration {
    let url =
        c.rt.port_forward(cri::PortForwardRequest {
            pod_sandbox_id: pod.into(),
            port: vec![i32::from(PORT)],
        })
        .await
        .expect("PortForward")
        .into_inner()
        .url;
    let t = Instant::now();
    let (n, err) = spdy_client::port_forward_read(&url, PORT)
        .await
        .expect("port-forward");
    let took = t.elapsed();
    assert_eq!((n, err.as_str()), (BYTES, ""), "bytes through the forward");
    took
}

fn main() {
    let runs: usize = std::env::args()
        .skip_while(|a| a != "--runs")
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    husk_tests::require_kvm();
    let registry = Registry::start();
    let image = registry.push_oci_archive(&images::busybox_archive(), "1", "husk/busybox");
    let huskd = Huskd::start(&registry.host);
    let rt = husk_tests::pod::runtime();
    let (streaming, sync, download_s) = rt.block_on(async {
        let mut c = huskd.connect();
        c.img
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: image.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .expect("PullImage");
        let sandbox = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "bench".into(),
                uid: "uid-bench".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: "bench".into(),
            log_directory: huskd.dir.join("pod-logs").display().to_string(),
            ..Default::default()
        };
        let pod =
            c.rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(sandbox.clone()),
                runtime_handler: "kata".into(),
            })
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", huskd.log()))
            .into_inner()
            .pod_sandbox_id;
        // Each connection: nc runs a script that writes 64 MiB of zeros and exits.
        let script = format!(
            "printf '#!/bin/sh\\nexec head -c {BYTES} /dev/zero\\n' > /zeros && \
             chmod +x /zeros && exec nc -ll -p {PORT} -e /zeros"
        );
        let id =
            c.rt.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(cri::ContainerConfig {
                    metadata: Some(cri::ContainerMetadata {
                        name: "zeros".into(),
                        attempt: 0,
                    }),
                    image: Some(cri::ImageSpec {
                        image: image.clone(),
                        ..Default::default()
                    }),
                    command: vec!["sh".into(), "-c".into(), script],
                    log_path: "zeros/0.log".into(),
                    ..Default::default()
                }),
                sandbox_config: Some(sandbox.clone()),
            })
            .await
            .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", huskd.log()))
            .into_inner()
            .container_id;
        c.rt.start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect("StartContainer");
        // Warm-up (and a check that both paths work) before timing.
        exec_sync(&mut c, &id).await;
        exec_streaming(&mut c, &id).await;
        let (mut streaming, mut sync) = (Vec::new(), Vec::new());
        for i in 0..runs {
            if i % 2 == 0 {
                streaming.push(ms(exec_streaming(&mut c, &id).await));
                sync.push(ms(exec_sync(&mut c, &id).await));
            } else {
                sync.push(ms(exec_sync(&mut c, &id).await));
                streaming.push(ms(exec_streaming(&mut c, &id).await));
            }
        }
        let mut secs = Vec::new();
        for _ in 0..3 {
            secs.push(download(&mut c, &pod).await.as_secs_f64());
        }
        let _ =
            c.rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await;
        let _ =
            c.rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod,
            })
            .await;
        (median(streaming), median(sync), median(secs))
    });
    let mbps = BYTES as f64 / (1024.0 * 1024.0) / download_s;
    let rows = [
        (
            format!("exec `true` via the streaming URL (Exec → exit), {runs} runs"),
            format!("{streaming:.1} ms"),
        ),
        (
            format!("ExecSync `true`, {runs} runs"),
            format!("{sync:.1} ms"),
        ),
        (
            "port-forward, 64 MiB pod → client, one stream, 3 runs".to_string(),
            format!("{mbps:.1} MB/s"),
        ),
        (
            "  (time for 64 MiB)".to_string(),
            format!("{download_s:.2} s"),
        ),
    ];
    println!(
        "\n| {:<58} | {:>12} |",
        "huskd streaming, one pod (median)", "result"
    );
    println!("|{}|{}|", "-".repeat(60), "-".repeat(14));
    for (what, v) in rows {
        println!("| {what:<58} | {v:>12} |");
    }
}
