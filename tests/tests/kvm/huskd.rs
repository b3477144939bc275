//! huskd end to end with KVM (in the lab): a tonic CRI client drives huskd, which pulls
//! busybox from a local docker-registry, runs a pod (handler `kata`) in a microVM through
//! our shim, creates and starts containers in it, writes their CRI log, answers ExecSync,
//! stops and removes everything, and leaves nothing behind. More of huskd in `huskd/`:
//! a pod across a huskd restart, the calls on live containers (stats, update, log
//! reopen), the pod's DNS/hostname/sysctls inside it, four pods started at once, a pod on
//! the built-in image through `huskctl`, the systemd cgroup driver, the containers' security
//! context, exec/attach through the streaming server, and port-forward into the pod's VM.
mod builtin_image;
mod cgroups;
mod concurrent;
mod fixture;
mod live;
mod oom;
mod pod_settings;
mod port_forward;
mod restart;
mod security;
mod streaming;

use std::path::Path;
use std::time::{Duration, Instant};

use husk_tests::containerd::cri::{parse_log, wait_log_line};
use husk_tests::huskd::{CriClient, Huskd};
use k8s_cri::v1 as cri;
use tonic::Code;

use fixture::Fixture;

fn pod_config(name: &str, log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.display().to_string(),
        labels: [("app".to_string(), name.to_string())].into(),
        ..Default::default()
    }
}

fn container_config(name: &str, image: &str, cmd: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}/0.log"),
        labels: [("c".to_string(), name.to_string())].into(),
        ..Default::default()
    }
}

async fn create(
    c: &mut CriClient,
    pod: &str,
    cfg: cri::ContainerConfig,
    sandbox: &cri::PodSandboxConfig,
) -> Result<String, tonic::Status> {
    c.rt.create_container(cri::CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(cfg),
        sandbox_config: Some(sandbox.clone()),
    })
    .await
    .map(|r| r.into_inner().container_id)
}

async fn status(c: &mut CriClient, id: &str) -> Result<cri::ContainerStatus, tonic::Status> {
    c.rt.container_status(cri::ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    })
    .await
    .map(|r| r.into_inner().status.expect("a status"))
}

async fn wait_exited(c: &mut CriClient, id: &str, timeout: Duration) -> cri::ContainerStatus {
    let deadline = Instant::now() + timeout;
    loop {
        let st = status(c, id).await.expect("ContainerStatus");
        if st.state == cri::ContainerState::ContainerExited as i32 {
            return st;
        }
        assert!(Instant::now() < deadline, "not exited: {st:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn list(c: &mut CriClient, f: cri::ContainerFilter) -> Vec<String> {
    let mut ids: Vec<String> =
        c.rt.list_containers(cri::ListContainersRequest { filter: Some(f) })
            .await
            .expect("ListContainers")
            .into_inner()
            .containers
            .into_iter()
            .map(|c| c.id)
            .collect();
    ids.sort();
    ids
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn husk_netns() -> Vec<String> {
    entries(Path::new("/var/run/netns"))
        .into_iter()
        .filter(|n| n.starts_with("husk-"))
        .collect()
}

/// Processes whose command line mentions `needle` (shims started for huskd's socket).
fn processes_with(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle)
                && !cmd.contains("--test-threads")
                && !cmd.contains("huskd --config")
            {
                out.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
            }
        }
    }
    out
}

/// RunPodSandbox with handler `kata`; returns the pod id.
async fn run_pod(c: &mut CriClient, huskd: &Huskd, sandbox: &cri::PodSandboxConfig) -> String {
    c.rt.run_pod_sandbox(cri::RunPodSandboxRequest {
        config: Some(sandbox.clone()),
        runtime_handler: "kata".into(),
    })
    .await
    .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\nhuskd log:\n{}", huskd.log()))
    .into_inner()
    .pod_sandbox_id
}

/// Creates and starts a container; returns its id.
async fn run_container(
    c: &mut CriClient,
    huskd: &Huskd,
    pod: &str,
    cfg: cri::ContainerConfig,
    sandbox: &cri::PodSandboxConfig,
) -> String {
    let id = create(c, pod, cfg, sandbox)
        .await
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\nhuskd log:\n{}", huskd.log()));
    c.rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("StartContainer: {e}\nhuskd log:\n{}", huskd.log()));
    id
}

/// Stops and removes the pod, then asserts huskd holds nothing and left nothing on the
/// host: records, bundles, writable layers, CNI cache and IPs, netns, shims.
async fn remove_pod_and_assert_nothing_left(
    c: &mut CriClient,
    huskd: &Huskd,
    pod: &str,
    netns_before: &[String],
) {
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
    assert_nothing_left(c, huskd, netns_before).await;
}

async fn assert_nothing_left(c: &mut CriClient, huskd: &Huskd, netns_before: &[String]) {
    assert!(list(c, cri::ContainerFilter::default()).await.is_empty());
    let pods =
        c.rt.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .items;
    assert!(pods.is_empty(), "{pods:?}");
    for d in [
        "state/bundles",
        "data/containers",
        "state/cni",
        "state/pods",
        "state/containers",
    ] {
        let left = entries(&huskd.dir.join(d));
        assert!(left.is_empty(), "{d}: {left:?}");
    }
    let ips: Vec<_> = entries(&huskd.dir.join("ipam/husk-huskd-test"))
        .into_iter()
        .filter(|n| n.starts_with("10."))
        .collect();
    assert!(ips.is_empty(), "IPs still allocated: {ips:?}");
    assert_eq!(husk_netns(), netns_before, "a netns was left");
    let shims = processes_with(&huskd.socket.display().to_string());
    assert!(shims.is_empty(), "shims left: {shims:?}");
}

/// pull → runp (kata) → create → start → CRI log → ExecSync (and its timeout) → a second
/// container's exit code → stop (timeout, then SIGKILL) → remove → stopp → rmp → nothing
/// left; bad input answers with the right code and leaves nothing.
#[test]
fn a_pod_through_huskd_logs_execs_and_leaves_nothing() {
    let f = Fixture::start();
    let (huskd, image) = (&f.huskd, &f.image);
    let rt = husk_tests::pod::runtime();
    rt.block_on(async {
        let (mut c, pulled) = f.client().await;
        let log_dir = f.log_dir();
        let sandbox = pod_config("hpod", &log_dir);
        let pod =
            c.rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(sandbox.clone()),
                runtime_handler: "kata".into(),
            })
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\nhuskd log:\n{}", huskd.log()))
            .into_inner()
            .pod_sandbox_id;
        f.lap("pod running");
        let ps =
            c.rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod.clone(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        assert_eq!(ps.state, cri::PodSandboxState::SandboxReady as i32);
        assert!(ps.created_at > 0);
        assert!(!ps.network.unwrap().ip.is_empty(), "the pod has a CNI IP");
        // ListPodSandbox filters by id, state and labels.
        for (filter, want) in [
            (
                cri::PodSandboxFilter {
                    label_selector: [("app".to_string(), "hpod".to_string())].into(),
                    ..Default::default()
                },
                vec![pod.clone()],
            ),
            (
                cri::PodSandboxFilter {
                    label_selector: [("app".to_string(), "other".to_string())].into(),
                    ..Default::default()
                },
                vec![],
            ),
            (
                cri::PodSandboxFilter {
                    id: pod.clone(),
                    state: Some(cri::PodSandboxStateValue {
                        state: cri::PodSandboxState::SandboxNotready as i32,
                    }),
                    ..Default::default()
                },
                vec![],
            ),
        ] {
            let got: Vec<String> =
                c.rt.list_pod_sandbox(cri::ListPodSandboxRequest {
                    filter: Some(filter.clone()),
                })
                .await
                .unwrap()
                .into_inner()
                .items
                .into_iter()
                .map(|p| p.id)
                .collect();
            assert_eq!(got, want, "{filter:?}");
        }

        // Bad input: the right code, and nothing made.
        let bundles = huskd.dir.join("state/bundles");
        let rw = huskd.dir.join("data/containers");
        let e = create(
            &mut c,
            &pod,
            container_config("x", "127.0.0.1:1/nope:1", &["true"]),
            &sandbox,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        let mut no_md = container_config("x", image, &["true"]);
        no_md.metadata = None;
        let e = create(&mut c, &pod, no_md, &sandbox).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let e = create(
            &mut c,
            "no-such-pod",
            container_config("x", image, &["true"]),
            &sandbox,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert_eq!(
            entries(&bundles),
            std::slice::from_ref(&pod),
            "only the pod's bundle"
        );
        assert!(entries(&rw).is_empty(), "{:?}", entries(&rw));

        // The main container: lines on both streams and one longer than a log record.
        let id = create(
            &mut c,
            &pod,
            container_config(
                "main",
                image,
                &[
                    "sh",
                    "-c",
                    "echo hello from huskd; echo to stderr >&2; \
                     head -c 20000 /dev/zero | tr '\\0' x; echo; sleep 600",
                ],
            ),
            &sandbox,
        )
        .await
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\nhuskd log:\n{}", huskd.log()));
        let st = status(&mut c, &id).await.unwrap();
        assert_eq!(st.state, cri::ContainerState::ContainerCreated as i32);
        c.rt.start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("StartContainer: {e}\nhuskd log:\n{}", huskd.log()));
        f.lap("container started");
        let log = log_dir.join("main/0.log");
        wait_log_line(&log, Duration::from_secs(60), |l| {
            l.stream == "stdout" && l.tag == "F" && l.text.starts_with('x')
        })
        .await;
        f.lap("its output is in the CRI log");
        let lines = parse_log(&std::fs::read_to_string(&log).unwrap());
        let has = |stream: &str, text: &str| {
            lines
                .iter()
                .any(|l| l.stream == stream && l.tag == "F" && l.text == text)
        };
        assert!(has("stdout", "hello from huskd"), "{lines:?}");
        assert!(has("stderr", "to stderr"), "{lines:?}");
        let xs: Vec<_> = lines.iter().filter(|l| l.text.starts_with('x')).collect();
        assert!(xs.len() >= 2, "a 20000-byte line is split: {xs:?}");
        assert!(xs[..xs.len() - 1].iter().all(|l| l.tag == "P"));
        assert_eq!(xs.last().unwrap().tag, "F");
        assert_eq!(xs.iter().map(|l| l.text.len()).sum::<usize>(), 20000);

        let st = status(&mut c, &id).await.unwrap();
        assert_eq!(st.state, cri::ContainerState::ContainerRunning as i32);
        assert!(
            st.created_at > 0 && st.started_at >= st.created_at,
            "{st:?}"
        );
        assert_eq!(st.log_path, log.display().to_string());
        assert!(!st.image.as_ref().unwrap().image.is_empty(), "{st:?}");
        assert!(!st.image_ref.is_empty(), "{st:?}");
        assert_eq!(st.image_id, pulled, "{st:?}");

        // ExecSync: exact output and the exit code.
        let r =
            c.rt.exec_sync(cri::ExecSyncRequest {
                container_id: id.clone(),
                cmd: ["sh", "-c", "echo out; echo err >&2; exit 3"]
                    .map(String::from)
                    .to_vec(),
                timeout: 0,
            })
            .await
            .unwrap_or_else(|e| panic!("ExecSync: {e}\nhuskd log:\n{}", huskd.log()))
            .into_inner();
        assert_eq!(String::from_utf8_lossy(&r.stdout), "out\n");
        assert_eq!(String::from_utf8_lossy(&r.stderr), "err\n");
        assert_eq!(r.exit_code, 3);
        f.lap("ExecSync answered");
        // A timed-out ExecSync answers, and its process is gone from the guest.
        let t = Instant::now();
        let e =
            c.rt.exec_sync(cri::ExecSyncRequest {
                container_id: id.clone(),
                cmd: ["sleep", "600"].map(String::from).to_vec(),
                timeout: 2,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
        assert!(
            (Duration::from_secs(2)..Duration::from_secs(40)).contains(&t.elapsed()),
            "{:?}",
            t.elapsed()
        );
        let r =
            c.rt.exec_sync(cri::ExecSyncRequest {
                container_id: id.clone(),
                cmd: ["sh", "-c", "cat /proc/[0-9]*/comm | grep -cx sleep"]
                    .map(String::from)
                    .to_vec(),
                timeout: 30,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            String::from_utf8_lossy(&r.stdout).trim(),
            "1",
            "only the container's sleep: {r:?}"
        );
        f.lap("ExecSync timeout killed its process");

        // A second container in the same VM; its exit code and reason.
        let fails = create(
            &mut c,
            &pod,
            container_config("fails", image, &["sh", "-c", "exit 7"]),
            &sandbox,
        )
        .await
        .unwrap();
        c.rt.start_container(cri::StartContainerRequest {
            container_id: fails.clone(),
        })
        .await
        .unwrap();
        let st = wait_exited(&mut c, &fails, Duration::from_secs(60)).await;
        assert_eq!((st.exit_code, st.reason.as_str()), (7, "Error"), "{st:?}");
        assert!(
            st.finished_at >= st.started_at && st.started_at > 0,
            "{st:?}"
        );
        f.lap("second container exited 7");

        // Filters.
        let mut both = vec![id.clone(), fails.clone()];
        both.sort();
        let by_pod = cri::ContainerFilter {
            pod_sandbox_id: pod.clone(),
            ..Default::default()
        };
        assert_eq!(list(&mut c, by_pod).await, both);
        let running = cri::ContainerFilter {
            state: Some(cri::ContainerStateValue {
                state: cri::ContainerState::ContainerRunning as i32,
            }),
            ..Default::default()
        };
        assert_eq!(list(&mut c, running).await, std::slice::from_ref(&id));
        let by_label = cri::ContainerFilter {
            label_selector: [("c".to_string(), "fails".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(list(&mut c, by_label).await, std::slice::from_ref(&fails));
        let by_other_pod = cri::ContainerFilter {
            pod_sandbox_id: "other".into(),
            ..Default::default()
        };
        assert!(list(&mut c, by_other_pod).await.is_empty());

        // Stop: sh as its PID namespace's init ignores SIGTERM, so the timeout runs out and
        // SIGKILL ends it. Stop and Remove are idempotent.
        let t = Instant::now();
        c.rt.stop_container(cri::StopContainerRequest {
            container_id: id.clone(),
            timeout: 2,
        })
        .await
        .unwrap_or_else(|e| panic!("StopContainer: {e}\nhuskd log:\n{}", huskd.log()));
        assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
        let st = status(&mut c, &id).await.unwrap();
        assert_eq!(st.state, cri::ContainerState::ContainerExited as i32);
        assert_eq!((st.exit_code, st.reason.as_str()), (137, "Error"), "{st:?}");
        f.lap("container stopped");
        for _ in 0..2 {
            c.rt.stop_container(cri::StopContainerRequest {
                container_id: id.clone(),
                timeout: 0,
            })
            .await
            .unwrap();
            c.rt.remove_container(cri::RemoveContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap();
        }
        assert_eq!(
            status(&mut c, &id).await.unwrap_err().code(),
            Code::NotFound
        );
        assert!(log.is_file(), "the log stays for kubelet");

        // The pod goes with the other container still in it.
        f.remove_pod_and_assert_nothing_left(&mut c, &pod).await;
        f.lap("pod stopped and removed");
    });
    f.finish();
}
