//! The CRI RuntimeService. Version, Status and RuntimeConfig answer now; the pod and
//! container calls answer UNIMPLEMENTED (explicitly, so kubelet and crictl say so) until
//! the pod layer arrives.

use std::future::Future;
use std::pin::Pin;

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use tonic::{Request, Response, Status};

use crate::cni;
use crate::config::{CgroupDriver, Config};

/// The CRI API version huskd speaks.
const CRI_API_VERSION: &str = "v1";
const RUNTIME_NAME: &str = "husk";

pub struct Runtime {
    config: Config,
}

impl Runtime {
    pub fn new(config: Config) -> Runtime {
        Runtime { config }
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
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus {
                conditions: vec![runtime, network],
            }),
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

    type GetContainerEventsStream = EventStream;

    async fn get_container_events(
        &self,
        _request: Request<cri::GetEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        Err(Status::unimplemented(
            "huskd does not implement get_container_events yet",
        ))
    }

    not_yet! {
        run_pod_sandbox: RunPodSandboxRequest => RunPodSandboxResponse,
        stop_pod_sandbox: StopPodSandboxRequest => StopPodSandboxResponse,
        remove_pod_sandbox: RemovePodSandboxRequest => RemovePodSandboxResponse,
        pod_sandbox_status: PodSandboxStatusRequest => PodSandboxStatusResponse,
        list_pod_sandbox: ListPodSandboxRequest => ListPodSandboxResponse,
        create_container: CreateContainerRequest => CreateContainerResponse,
        start_container: StartContainerRequest => StartContainerResponse,
        stop_container: StopContainerRequest => StopContainerResponse,
        remove_container: RemoveContainerRequest => RemoveContainerResponse,
        list_containers: ListContainersRequest => ListContainersResponse,
        container_status: ContainerStatusRequest => ContainerStatusResponse,
        update_container_resources: UpdateContainerResourcesRequest => UpdateContainerResourcesResponse,
        reopen_container_log: ReopenContainerLogRequest => ReopenContainerLogResponse,
        exec_sync: ExecSyncRequest => ExecSyncResponse,
        exec: ExecRequest => ExecResponse,
        attach: AttachRequest => AttachResponse,
        port_forward: PortForwardRequest => PortForwardResponse,
        container_stats: ContainerStatsRequest => ContainerStatsResponse,
        list_container_stats: ListContainerStatsRequest => ListContainerStatsResponse,
        pod_sandbox_stats: PodSandboxStatsRequest => PodSandboxStatsResponse,
        list_pod_sandbox_stats: ListPodSandboxStatsRequest => ListPodSandboxStatsResponse,
        update_runtime_config: UpdateRuntimeConfigRequest => UpdateRuntimeConfigResponse,
        checkpoint_container: CheckpointContainerRequest => CheckpointContainerResponse,
        list_metric_descriptors: ListMetricDescriptorsRequest => ListMetricDescriptorsResponse,
        list_pod_sandbox_metrics: ListPodSandboxMetricsRequest => ListPodSandboxMetricsResponse,
    }
}
