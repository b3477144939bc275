//! The CRI RuntimeService. Version, Status, RuntimeConfig, the pod sandbox calls, the
//! container lifecycle, ExecSync, UpdateContainerResources, ReopenContainerLog and the
//! stats calls answer (container calls in `containers.rs`, stats in `stats.rs`); the rest
//! answer UNIMPLEMENTED (explicitly, so kubelet and crictl say so).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use tonic::{Request, Response, Status};

use super::containers::{self as ctr, container_status_code};
use super::{pod_status, stats};
use crate::cni::{self, PortMapping};
use crate::config::{CgroupDriver, Config};
use crate::containers::Containers;
use crate::pods::{Pod, PodSpec, PodState, Pods};
use crate::streaming::server::StreamingServer;

/// The CRI API version huskd speaks.
const CRI_API_VERSION: &str = "v1";
const RUNTIME_NAME: &str = "husk";

pub struct Runtime {
    config: Config,
    pods: Arc<Pods>,
    containers: Arc<Containers>,
    streaming: Arc<StreamingServer>,
}

impl Runtime {
    pub fn new(
        config: Config,
        pods: Arc<Pods>,
        containers: Arc<Containers>,
        streaming: Arc<StreamingServer>,
    ) -> Runtime {
        Runtime {
            config,
            pods,
            containers,
            streaming,
        }
    }

    /// Stops the pod's containers, then the pod: its shim exits only once it holds no task
    /// but the sandbox. Shared by StopPodSandbox and RemovePodSandbox (which stops first).
    async fn stop_pod_and_containers(&self, id: &str) -> Result<(), Status> {
        self.containers
            .stop_pod(id)
            .await
            .map_err(container_status_code)?;
        self.pods.stop(id).await.map_err(pod_status)
    }
}

/// CRI's pod config in the pod layer's terms.
fn pod_spec(c: cri::PodSandboxConfig) -> PodSpec {
    let md = c.metadata.unwrap_or_default();
    let ns = c
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default();
    let node = cri::NamespaceMode::Node as i32;
    let host_namespaces = [("network", ns.network), ("pid", ns.pid), ("ipc", ns.ipc)]
        .into_iter()
        .filter(|(_, mode)| *mode == node)
        .map(|(name, _)| name)
        .collect();
    let port_mappings = c
        .port_mappings
        .iter()
        .filter(|p| p.host_port > 0)
        .map(|p| PortMapping {
            host_port: p.host_port as u16,
            container_port: p.container_port as u16,
            protocol: match cri::Protocol::try_from(p.protocol) {
                Ok(cri::Protocol::Udp) => "udp",
                Ok(cri::Protocol::Sctp) => "sctp",
                _ => "tcp",
            }
            .into(),
            host_ip: p.host_ip.clone(),
        })
        .collect();
    let dns = c.dns_config.map(|d| crate::pod_files::DnsConfig {
        servers: d.servers,
        searches: d.searches,
        options: d.options,
    });
    let sysctls = c
        .linux
        .as_ref()
        .map(|l| l.sysctls.clone().into_iter().collect())
        .unwrap_or_default();
    let cgroup_parent = c
        .linux
        .as_ref()
        .map(|l| l.cgroup_parent.clone())
        .unwrap_or_default();
    PodSpec {
        name: md.name,
        namespace: md.namespace,
        uid: md.uid,
        attempt: md.attempt,
        hostname: c.hostname,
        log_directory: c.log_directory,
        labels: c.labels.into_iter().collect(),
        annotations: c.annotations.into_iter().collect(),
        port_mappings,
        host_namespaces,
        privileged: c
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .is_some_and(|s| s.privileged),
        dns,
        sysctls,
        cgroup_parent,
    }
}

fn cri_state(s: PodState) -> i32 {
    match s {
        PodState::Ready => cri::PodSandboxState::SandboxReady as i32,
        PodState::NotReady => cri::PodSandboxState::SandboxNotready as i32,
    }
}

fn metadata(p: &Pod) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: p.spec.name.clone(),
        uid: p.spec.uid.clone(),
        namespace: p.spec.namespace.clone(),
        attempt: p.spec.attempt,
    }
}

/// Methods not implemented yet, each answering UNIMPLEMENTED with its name. The signature
/// is what `#[async_trait]` makes of the trait's `async fn`s.
macro_rules! not_yet {
    ($($name:ident: $req:ident => $resp:ident),* $(,)?) => {$(
        fn $name<'life0, 'async_trait>(
            &'life0 self,
            _request: Request<cri::$req>,
        ) -> Pin<Box<dyn Future<Output = Result<Response<cri::$resp>, Status>> + Send + 'async_trait>>
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            Box::pin(async {
                Err(Status::unimplemented(concat!(
                    "huskd does not implement ",
                    stringify!($name),
                    " yet"
                )))
            })
        }
    )*};
}

type EventStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send>>;

#[tonic::async_trait]
impl RuntimeService for Runtime {
    async fn version(
        &self,
        _request: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        Ok(Response::new(cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: CRI_API_VERSION.into(),
        }))
    }

    async fn status(
        &self,
        _request: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        let network = match cni::Network::load(&self.config.cni.conf_dir) {
            Ok(net) => cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: true,
                reason: String::new(),
                message: format!("CNI network {:?}", net.name()),
            },
            Err(e) => cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: false,
                reason: "NetworkPluginNotReady".into(),
                message: e.to_string(),
            },
        };
        let runtime = cri::RuntimeCondition {
            r#type: "RuntimeReady".into(),
            status: true,
            ..Default::default()
        };
        // Every handler runs our shim: no recursive read-only mounts or user namespaces yet.
        let runtime_handlers = self
            .config
            .runtime_handlers
            .iter()
            .map(|h| cri::RuntimeHandler {
                name: h.clone(),
                features: Some(cri::RuntimeHandlerFeatures::default()),
            })
            .collect();
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus {
                conditions: vec![runtime, network],
            }),
            runtime_handlers,
            ..Default::default()
        }))
    }

    async fn runtime_config(
        &self,
        _request: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        let driver = match self.config.cgroup_driver {
            CgroupDriver::Cgroupfs => cri::CgroupDriver::Cgroupfs,
            CgroupDriver::Systemd => cri::CgroupDriver::Systemd,
        };
        Ok(Response::new(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: driver as i32,
            }),
        }))
    }

    async fn run_pod_sandbox(
        &self,
        request: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        let req = request.into_inner();
        let config = req
            .config
            .ok_or_else(|| Status::invalid_argument("RunPodSandbox: no config"))?;
        let id = self
            .pods
            .run(pod_spec(config), &req.runtime_handler)
            .await
            .map_err(pod_status)?;
        Ok(Response::new(cri::RunPodSandboxResponse {
            pod_sandbox_id: id,
        }))
    }

    async fn stop_pod_sandbox(
        &self,
        request: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        self.stop_pod_and_containers(&id).await?;
        Ok(Response::new(cri::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        request: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        self.stop_pod_and_containers(&id).await?;
        self.containers
            .remove_pod(&id)
            .await
            .map_err(container_status_code)?;
        self.pods.remove(&id).await.map_err(pod_status)?;
        Ok(Response::new(cri::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        request: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        let p = self
            .pods
            .get(&id)
            .await
            .ok_or_else(|| Status::not_found(format!("pod sandbox {id:?} not found")))?;
        let status = cri::PodSandboxStatus {
            id: p.id.clone(),
            metadata: Some(metadata(&p)),
            state: cri_state(p.state),
            created_at: p.created_at_ns,
            network: Some(cri::PodSandboxNetworkStatus {
                ip: p.ip.clone().unwrap_or_default(),
                additional_ips: vec![],
            }),
            labels: p.spec.labels.clone().into_iter().collect(),
            annotations: p.spec.annotations.clone().into_iter().collect(),
            runtime_handler: p.handler.clone(),
            ..Default::default()
        };
        Ok(Response::new(cri::PodSandboxStatusResponse {
            status: Some(status),
            ..Default::default()
        }))
    }

    async fn list_pod_sandbox(
        &self,
        request: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        let f = request.into_inner().filter.unwrap_or_default();
        let items = self
            .pods
            .list()
            .await
            .into_iter()
            .filter(|p| f.id.is_empty() || p.id == f.id)
            .filter(|p| {
                f.state
                    .as_ref()
                    .is_none_or(|s| s.state == cri_state(p.state))
            })
            .filter(|p| {
                f.label_selector
                    .iter()
                    .all(|(k, v)| p.spec.labels.get(k) == Some(v))
            })
            .map(|p| cri::PodSandbox {
                id: p.id.clone(),
                metadata: Some(metadata(&p)),
                state: cri_state(p.state),
                created_at: p.created_at_ns,
                labels: p.spec.labels.clone().into_iter().collect(),
                annotations: p.spec.annotations.clone().into_iter().collect(),
                runtime_handler: p.handler.clone(),
            })
            .collect();
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    type GetContainerEventsStream = EventStream;

    async fn get_container_events(
        &self,
        _request: Request<cri::GetEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        Err(Status::unimplemented(
            "huskd does not implement get_container_events yet",
        ))
    }

    async fn create_container(
        &self,
        request: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        let id = ctr::create(&self.pods, &self.containers, request.into_inner()).await?;
        Ok(Response::new(cri::CreateContainerResponse {
            container_id: id,
        }))
    }

    async fn start_container(
        &self,
        request: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        self.containers
            .start(&id)
            .await
            .map_err(container_status_code)?;
        Ok(Response::new(cri::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        request: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        let req = request.into_inner();
        let timeout = std::time::Duration::from_secs(req.timeout.max(0) as u64);
        self.containers
            .stop(&req.container_id, timeout)
            .await
            .map_err(container_status_code)?;
        Ok(Response::new(cri::StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        request: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        self.containers
            .remove(&id)
            .await
            .map_err(container_status_code)?;
        Ok(Response::new(cri::RemoveContainerResponse {}))
    }

    async fn list_containers(
        &self,
        request: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        let containers = ctr::list(&self.containers, request.into_inner().filter);
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        request: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        let status = ctr::status(&self.containers, &request.into_inner().container_id)?;
        Ok(Response::new(cri::ContainerStatusResponse {
            status: Some(status),
            ..Default::default()
        }))
    }

    async fn exec_sync(
        &self,
        request: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        Ok(Response::new(
            ctr::exec_sync(&self.containers, request.into_inner()).await?,
        ))
    }

    async fn exec(
        &self,
        request: Request<cri::ExecRequest>,
    ) -> Result<Response<cri::ExecResponse>, Status> {
        Ok(Response::new(super::streaming::exec(
            &self.streaming,
            &self.containers,
            request.into_inner(),
        )?))
    }

    async fn attach(
        &self,
        request: Request<cri::AttachRequest>,
    ) -> Result<Response<cri::AttachResponse>, Status> {
        Ok(Response::new(super::streaming::attach(
            &self.streaming,
            &self.containers,
            request.into_inner(),
        )?))
    }

    async fn port_forward(
        &self,
        request: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        Ok(Response::new(
            super::streaming::port_forward(&self.streaming, &self.pods, request.into_inner())
                .await?,
        ))
    }

    async fn update_container_resources(
        &self,
        request: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        ctr::update_resources(&self.containers, request.into_inner()).await?;
        Ok(Response::new(cri::UpdateContainerResourcesResponse {}))
    }

    async fn reopen_container_log(
        &self,
        request: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        self.containers
            .reopen_log(&request.into_inner().container_id)
            .map_err(container_status_code)?;
        Ok(Response::new(cri::ReopenContainerLogResponse {}))
    }

    async fn container_stats(
        &self,
        request: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        let id = request.into_inner().container_id;
        let s = stats::container_stats(&self.containers, &id).await?;
        Ok(Response::new(cri::ContainerStatsResponse {
            stats: Some(s),
        }))
    }

    async fn list_container_stats(
        &self,
        request: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        let f = request.into_inner().filter;
        let stats = stats::list_container_stats(&self.containers, f).await;
        Ok(Response::new(cri::ListContainerStatsResponse { stats }))
    }

    async fn pod_sandbox_stats(
        &self,
        request: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        let s = stats::pod_sandbox_stats(&self.pods, &self.containers, &id).await?;
        Ok(Response::new(cri::PodSandboxStatsResponse {
            stats: Some(s),
        }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        request: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        let f = request.into_inner().filter;
        let stats = stats::list_pod_sandbox_stats(&self.pods, &self.containers, f).await;
        Ok(Response::new(cri::ListPodSandboxStatsResponse { stats }))
    }

    not_yet! {
        update_runtime_config: UpdateRuntimeConfigRequest => UpdateRuntimeConfigResponse,
        checkpoint_container: CheckpointContainerRequest => CheckpointContainerResponse,
        list_metric_descriptors: ListMetricDescriptorsRequest => ListMetricDescriptorsResponse,
        list_pod_sandbox_metrics: ListPodSandboxMetricsRequest => ListPodSandboxMetricsResponse,
    }
}
