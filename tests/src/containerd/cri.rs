//! A CRI v1 client over a containerd socket (tonic + `k8s-cri`), with the calls the tests
//! make the way kubelet makes them, and a reader of the CRI log files containerd writes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub use cri::ContainerState;

/// A CRI call's error, with the call's name.
#[derive(Debug)]
pub struct CriError {
    pub call: &'static str,
    pub status: tonic::Status,
}

impl std::fmt::Display for CriError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CRI {} failed: {:?}: {}",
            self.call,
            self.status.code(),
            self.status.message()
        )
    }
}

impl std::error::Error for CriError {}

pub type Result<T> = std::result::Result<T, CriError>;

fn call<T>(
    name: &'static str,
    r: std::result::Result<tonic::Response<T>, tonic::Status>,
) -> Result<T> {
    r.map(tonic::Response::into_inner)
        .map_err(|status| CriError { call: name, status })
}

/// A pod sandbox the tests ran: its id and the config it was run with (CreateContainer
/// needs it again, as kubelet sends it).
#[derive(Clone, Debug)]
pub struct Pod {
    pub id: String,
    pub config: cri::PodSandboxConfig,
}

impl Pod {
    pub fn log_dir(&self) -> PathBuf {
        PathBuf::from(&self.config.log_directory)
    }
}

/// The CRI RuntimeService and ImageService of one containerd.
#[derive(Clone)]
pub struct Cri {
    rt: RuntimeServiceClient<Channel>,
    img: ImageServiceClient<Channel>,
}

impl Cri {
    /// Connects to containerd's gRPC socket (lazily: the first call dials).
    pub fn connect(socket: &Path) -> Cri {
        let socket = socket.to_path_buf();
        let channel =
            Endpoint::from_static("http://[::]").connect_with_connector_lazy(tower::service_fn(
                move |_: Uri| {
                    let socket = socket.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?))
                    }
                },
            ));
        Cri {
            rt: RuntimeServiceClient::new(channel.clone()),
            img: ImageServiceClient::new(channel),
        }
    }

    pub async fn version(&mut self) -> Result<cri::VersionResponse> {
        call(
            "Version",
            self.rt.version(cri::VersionRequest::default()).await,
        )
    }

    /// Whether CRI knows `image` (containerd's CRI learns of imported images by event).
    pub async fn image_present(&mut self, image: &str) -> Result<bool> {
        let r = call(
            "ImageStatus",
            self.img
                .image_status(cri::ImageStatusRequest {
                    image: Some(cri::ImageSpec {
                        image: image.into(),
                        ..Default::default()
                    }),
                    verbose: false,
                })
                .await,
        )?;
        Ok(r.image.is_some())
    }

    /// RunPodSandbox with runtime handler `handler`; logs go under `log_root/<name>`; the
    /// pod's cgroups (cgroupfs driver) under `cgroup_parent`, as kubelet's `/kubepods/...`.
    pub async fn run_pod(
        &mut self,
        name: &str,
        handler: &str,
        log_root: &Path,
        cgroup_parent: &str,
    ) -> Result<Pod> {
        self.run_pod_with_ports(name, handler, log_root, cgroup_parent, Vec::new())
            .await
    }

    /// [`Cri::run_pod`] with hostPort mappings (CNI's `portmap` sets them up).
    pub async fn run_pod_with_ports(
        &mut self,
        name: &str,
        handler: &str,
        log_root: &Path,
        cgroup_parent: &str,
        port_mappings: Vec<cri::PortMapping>,
    ) -> Result<Pod> {
        let log_dir = log_root.join(name);
        std::fs::create_dir_all(&log_dir).expect("create the pod log directory");
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            port_mappings,
            log_directory: log_dir.to_string_lossy().into_owned(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: cgroup_parent.into(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    // kubelet's default: shared network and IPC, a PID namespace per container.
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Pod as i32,
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = call(
            "RunPodSandbox",
            self.rt
                .run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(config.clone()),
                    runtime_handler: handler.into(),
                })
                .await,
        )?;
        Ok(Pod {
            id: r.pod_sandbox_id,
            config,
        })
    }

    /// CreateContainer + StartContainer of `image` running `args` in `pod`; its CRI log is
    /// `<pod log dir>/<name>.log`. Returns the container id.
    pub async fn run_container(
        &mut self,
        pod: &Pod,
        name: &str,
        image: &str,
        args: &[&str],
    ) -> Result<String> {
        self.run_container_with(pod, name, image, args, cri::LinuxContainerConfig::default())
            .await
    }

    /// [`Cri::run_container`] with a container Linux config (resources, as kubelet sets
    /// them from the pod spec's limits).
    pub async fn run_container_with(
        &mut self,
        pod: &Pod,
        name: &str,
        image: &str,
        args: &[&str],
        linux: cri::LinuxContainerConfig,
    ) -> Result<String> {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            command: args.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            labels: HashMap::from([("husk-test".to_string(), name.to_string())]),
            linux: Some(linux),
            ..Default::default()
        };
        let r = call(
            "CreateContainer",
            self.rt
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: pod.id.clone(),
                    config: Some(config),
                    sandbox_config: Some(pod.config.clone()),
                })
                .await,
        )?;
        call(
            "StartContainer",
            self.rt
                .start_container(cri::StartContainerRequest {
                    container_id: r.container_id.clone(),
                })
                .await,
        )?;
        Ok(r.container_id)
    }

    pub async fn container_status(&mut self, id: &str) -> Result<cri::ContainerStatus> {
        let r = call(
            "ContainerStatus",
            self.rt
                .container_status(cri::ContainerStatusRequest {
                    container_id: id.into(),
                    verbose: false,
                })
                .await,
        )?;
        Ok(r.status.expect("ContainerStatus answered without a status"))
    }

    /// PodSandboxStatus's status of the pod.
    async fn pod_status(&mut self, pod_id: &str) -> Result<cri::PodSandboxStatus> {
        let r = call(
            "PodSandboxStatus",
            self.rt
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: pod_id.into(),
                    verbose: false,
                })
                .await,
        )?;
        Ok(r.status
            .expect("PodSandboxStatus answered without a status"))
    }

    /// Whether PodSandboxStatus says the pod is SANDBOX_READY.
    pub async fn pod_ready(&mut self, pod_id: &str) -> Result<bool> {
        let st = self.pod_status(pod_id).await?;
        Ok(st.state == cri::PodSandboxState::SandboxReady as i32)
    }

    /// The pod's IP as CNI gave it (PodSandboxStatus `network.ip`).
    pub async fn pod_ip(&mut self, pod_id: &str) -> Result<String> {
        let st = self.pod_status(pod_id).await?;
        Ok(st.network.map(|n| n.ip).unwrap_or_default())
    }

    /// ContainerStats of one container.
    pub async fn container_stats(&mut self, id: &str) -> Result<cri::ContainerStats> {
        let r = call(
            "ContainerStats",
            self.rt
                .container_stats(cri::ContainerStatsRequest {
                    container_id: id.into(),
                })
                .await,
        )?;
        Ok(r.stats.expect("ContainerStats answered without stats"))
    }

    /// UpdateContainerResources with Linux resources.
    pub async fn update_resources(
        &mut self,
        id: &str,
        linux: cri::LinuxContainerResources,
    ) -> Result<()> {
        call(
            "UpdateContainerResources",
            self.rt
                .update_container_resources(cri::UpdateContainerResourcesRequest {
                    container_id: id.into(),
                    linux: Some(linux),
                    ..Default::default()
                })
                .await,
        )?;
        Ok(())
    }

    /// Polls ContainerStatus until the container has exited; panics after `timeout`.
    pub async fn wait_exited(
        &mut self,
        id: &str,
        timeout: Duration,
    ) -> Result<cri::ContainerStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.container_status(id).await?;
            if st.state == ContainerState::ContainerExited as i32 {
                return Ok(st);
            }
            assert!(
                Instant::now() < deadline,
                "container {id} did not exit within {timeout:?}: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// ExecSync of `cmd` with a timeout in seconds (0 = none).
    pub async fn exec_sync(
        &mut self,
        id: &str,
        cmd: &[&str],
        timeout_s: i64,
    ) -> Result<cri::ExecSyncResponse> {
        call(
            "ExecSync",
            self.rt
                .exec_sync(cri::ExecSyncRequest {
                    container_id: id.into(),
                    cmd: cmd.iter().map(|s| s.to_string()).collect(),
                    timeout: timeout_s,
                })
                .await,
        )
    }

    /// StopPodSandbox then RemovePodSandbox, as kubelet tears a pod down.
    pub async fn stop_remove_pod(&mut self, pod_id: &str) -> Result<()> {
        call(
            "StopPodSandbox",
            self.rt
                .stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: pod_id.into(),
                })
                .await,
        )?;
        call(
            "RemovePodSandbox",
            self.rt
                .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: pod_id.into(),
                })
                .await,
        )?;
        Ok(())
    }

    /// Every pod sandbox's id.
    pub async fn pod_ids(&mut self) -> Result<Vec<String>> {
        let r = call(
            "ListPodSandbox",
            self.rt
                .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
                .await,
        )?;
        Ok(r.items.into_iter().map(|p| p.id).collect())
    }
}

/// One line of a CRI log file: `<RFC 3339 time> <stdout|stderr> <F|P> <text>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub time: String,
    pub stream: String,
    /// `F` (a full line) or `P` (partial, continued by the next).
    pub tag: String,
    pub text: String,
}

/// Parses a CRI log file's content; panics on a line not in the CRI format.
pub fn parse_log(content: &str) -> Vec<LogLine> {
    content
        .lines()
        .map(|l| {
            let mut parts = l.splitn(4, ' ');
            let (time, stream, tag) = (parts.next(), parts.next(), parts.next());
            let (Some(time), Some(stream), Some(tag)) = (time, stream, tag) else {
                panic!("not a CRI log line: {l:?}");
            };
            assert!(
                time.len() >= 20 && time.as_bytes()[10] == b'T' && time.ends_with('Z')
                    || time.contains('+'),
                "not an RFC 3339 time in CRI log line {l:?}"
            );
            assert!(
                stream == "stdout" || stream == "stderr",
                "bad stream in {l:?}"
            );
            assert!(tag == "F" || tag == "P", "bad tag in {l:?}");
            LogLine {
                time: time.into(),
                stream: stream.into(),
                tag: tag.into(),
                text: parts.next().unwrap_or("").into(),
            }
        })
        .collect()
}

/// Waits until the CRI log at `path` has a line satisfying `want` (containerd writes the
/// log from the container's FIFOs asynchronously); panics with the log after `timeout`.
pub async fn wait_log_line(
    path: &Path,
    timeout: Duration,
    want: impl Fn(&LogLine) -> bool,
) -> Vec<LogLine> {
    let deadline = Instant::now() + timeout;
    loop {
        let content = std::fs::read_to_string(path).unwrap_or_default();
        let lines = parse_log(&content);
        if lines.iter().any(&want) {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "the CRI log {} has no expected line after {timeout:?}; it has:\n{content}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cri_log_lines() {
        let l = parse_log(
            "2026-11-30T13:00:00.123456789Z stdout F hi there\n2026-11-30T13:00:00.2Z stderr P \n",
        );
        assert_eq!(l[0].stream, "stdout");
        assert_eq!(l[0].text, "hi there");
        assert_eq!(l[1].tag, "P");
        assert_eq!(l[1].text, "");
    }

    #[test]
    #[should_panic(expected = "bad stream")]
    fn rejects_a_line_in_another_format() {
        parse_log("2026-11-30T13:00:00Z out F hi\n");
    }
}
