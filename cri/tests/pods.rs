//! RunPodSandbox's thinnest real path on this host: huskd makes the netns, runs CNI
//! (Debian's bridge + host-local on a test bridge, 10.241.x.0/24), starts our shim
//! (`containerd-shim-husk-v2 start`) and has it Create the sandbox task over ttrpc. The
//! shim's VMM is configured as a path that does not exist, so Create fails inside the shim
//! on any host: the CRI error carries the shim's answer, and nothing of the pod is left.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_cri::v1 as cri;
use support::{CriClient, Huskd};
use tonic::Code;

fn shim_binary() -> PathBuf {
    // huskd finds the shim beside itself, as it does when installed.
    let p = Path::new(env!("CARGO_BIN_EXE_huskd")).with_file_name("containerd-shim-husk-v2");
    assert!(
        p.is_file(),
        "{} is missing: build it first (cargo build --workspace --bins, as scripts/test does)",
        p.display()
    );
    p
}

fn pod_config(name: &str, host_network: bool) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: if host_network {
                        cri::NamespaceMode::Node as i32
                    } else {
                        cri::NamespaceMode::Pod as i32
                    },
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn run_pod(
    c: &mut CriClient,
    name: &str,
    handler: &str,
    host_network: bool,
) -> Result<String, tonic::Status> {
    c.rt.run_pod_sandbox(cri::RunPodSandboxRequest {
        config: Some(pod_config(name, host_network)),
        runtime_handler: handler.into(),
    })
    .await
    .map(|r| r.into_inner().pod_sandbox_id)
}

fn husk_netns() -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("husk-") && !n.starts_with("husk-cnitest"))
                .collect()
        })
        .unwrap_or_default()
}

/// Processes whose command line mentions `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) && !cmd.contains("--test-threads") {
                out.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_whose_vm_cannot_start_fails_cleanly() {
    shim_binary();
    for p in ["bridge", "host-local"] {
        assert!(
            Path::new("/usr/lib/cni").join(p).is_file(),
            "/usr/lib/cni/{p} missing"
        );
    }
    let pid = std::process::id();
    let bridge = format!("hkp{}", pid % 1_000_000);
    let _bridge_guard = DeleteLink(bridge.clone());
    let subnet = format!("10.241.{}.0/24", pid % 250);
    let netns_before = husk_netns();
    let huskd = Huskd::start_with("vmm = \"/nonexistent/husk-vmm\"", "", |dir| {
        std::fs::write(
            dir.join("net.d/10-test.conflist"),
            format!(
                r#"{{"cniVersion":"1.0.0","name":"husk-podtest","plugins":[
                  {{"type":"bridge","bridge":"{bridge}","isGateway":true,
                    "ipam":{{"type":"host-local","ranges":[[{{"subnet":"{subnet}"}}]],
                             "dataDir":"{}/ipam"}}}}]}}"#,
                dir.display()
            ),
        )
        .unwrap();
    });
    let mut c = huskd.connect();

    let st =
        c.rt.status(cri::StatusRequest::default())
            .await
            .unwrap()
            .into_inner();
    let conds = st.status.unwrap().conditions;
    assert!(conds.iter().all(|c| c.status), "{conds:?}");
    let handlers: Vec<_> = st
        .runtime_handlers
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    assert_eq!(handlers, ["kata", "husk", ""]);

    // Unknown handler and host network: refused before anything is made.
    let e = run_pod(&mut c, "p0", "runc", false).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("\"kata\""), "{e:?}");
    let e = run_pod(&mut c, "p1", "kata", true).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("host's network namespace"), "{e:?}");

    // The shim's Create fails (no VMM here, or no usable KVM): its answer reaches CRI.
    let e = run_pod(&mut c, "p2", "kata", false).await.unwrap_err();
    eprintln!("RunPodSandbox answered: {:?}: {}", e.code(), e.message());
    assert_eq!(e.code(), Code::Unknown, "{e:?}");
    assert!(
        e.message().contains("shim task Create")
            && (e.message().contains("/nonexistent/husk-vmm")
                || e.message().contains("cannot run husk microVMs")),
        "{e:?}\nhuskd log:\n{}",
        huskd.log()
    );

    // Nothing is left: netns, IP allocation, veth, shim process, bundle, CNI cache.
    assert_eq!(husk_netns(), netns_before, "a netns was left");
    let ipam = huskd.dir.join("ipam/husk-podtest");
    let ips: Vec<_> = std::fs::read_dir(&ipam)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        ips.iter().all(|n| !n.to_string_lossy().starts_with("10.")),
        "IPs still allocated: {ips:?}"
    );
    let ports = Command::new("ip")
        .args(["-o", "link", "show", "master", &bridge])
        .output()
        .unwrap();
    assert!(
        ports.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&ports.stdout)
    );
    assert_eq!(
        processes_with(&huskd.socket.display().to_string()),
        Vec::<String>::new()
    );
    let state = huskd.dir.join("state");
    for d in ["bundles", "cni"] {
        let left: Vec<_> = std::fs::read_dir(state.join(d))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "left in {d}: {left:?}");
    }
    let pods =
        c.rt.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .items;
    assert!(pods.is_empty(), "{pods:?}");

    // Stop and Remove of a pod that does not exist succeed; its status is NotFound.
    c.rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: "nope".into(),
    })
    .await
    .unwrap();
    c.rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: "nope".into(),
    })
    .await
    .unwrap();
    let e =
        c.rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: "nope".into(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Containers: one in a pod that does not exist is NotFound; Stop and Remove of a
    // container that does not exist succeed; its status and ExecSync are NotFound.
    let e =
        c.rt.create_container(cri::CreateContainerRequest {
            pod_sandbox_id: "nope".into(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: "c".into(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: "busybox".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            sandbox_config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("pod sandbox \"nope\""), "{e:?}");
    c.rt.stop_container(cri::StopContainerRequest {
        container_id: "nope".into(),
        timeout: 1,
    })
    .await
    .unwrap();
    c.rt.remove_container(cri::RemoveContainerRequest {
        container_id: "nope".into(),
    })
    .await
    .unwrap();
    let e =
        c.rt.container_status(cri::ContainerStatusRequest {
            container_id: "nope".into(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e =
        c.rt.exec_sync(cri::ExecSyncRequest {
            container_id: "nope".into(),
            cmd: vec!["true".into()],
            timeout: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // Exec hands out a streaming URL only for a running container.
    let e =
        c.rt.exec(cri::ExecRequest {
            container_id: "nope".into(),
            cmd: vec!["true".into()],
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e =
        c.rt.attach(cri::AttachRequest {
            container_id: "nope".into(),
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let listed =
        c.rt.list_containers(cri::ListContainersRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .containers;
    assert!(listed.is_empty(), "{listed:?}");
}

/// Deletes the test bridge (made by the bridge plugin) however the test ends.
struct DeleteLink(String);

impl Drop for DeleteLink {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}
