//! ttrpc service implementations: thin adapters from the generated traits to [`Agent`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use async_trait::async_trait;
use husk_proto::agent as pb;
use husk_proto::agent_ttrpc as svc;
use ttrpc::r#async::TtrpcContext;

use crate::agent::Agent;

type R<T> = ttrpc::Result<T>;

/// Implements every service of the agent API.
#[derive(Clone)]
pub struct Services {
    agent: Arc<Agent>,
}

impl Services {
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }

    /// All services, ready for `ttrpc::r#async::Server::register_service`.
    pub fn registry(self) -> HashMap<String, ttrpc::r#async::Service> {
        let s = Arc::new(self);
        let mut m = HashMap::new();
        m.extend(svc::create_health(s.clone()));
        m.extend(svc::create_sandbox(s.clone()));
        m.extend(svc::create_containers(s.clone()));
        m.extend(svc::create_io(s.clone()));
        m.extend(svc::create_events(s.clone()));
        m.extend(svc::create_network(s));
        m
    }
}

/// Logs failed calls (the client sees the status; the console should too).
fn log<T>(what: &str, r: crate::error::Result<T>) -> R<T> {
    r.map_err(|e| {
        tracing::warn!(rpc = what, code = ?e.code(), "{e}");
        e.into()
    })
}

#[async_trait]
impl svc::Health for Services {
    async fn check(&self, _: &TtrpcContext, _: pb::CheckRequest) -> R<pb::CheckResponse> {
        let mut r = pb::CheckResponse::new();
        r.status = pb::check_response::ServingStatus::SERVING.into();
        Ok(r)
    }

    async fn version(&self, _: &TtrpcContext, _: pb::CheckRequest) -> R<pb::VersionResponse> {
        let mut r = pb::VersionResponse::new();
        r.agent_version = env!("CARGO_PKG_VERSION").to_string();
        r.api_version = husk_proto::AGENT_API_VERSION.to_string();
        (r.boot_init_ms, r.boot_serving_ms) = crate::boot_timeline::get();
        Ok(r)
    }
}

#[async_trait]
impl svc::Sandbox for Services {
    async fn create_sandbox(
        &self,
        _: &TtrpcContext,
        req: pb::CreateSandboxRequest,
    ) -> R<pb::Empty> {
        log("CreateSandbox", self.agent.create_sandbox(&req).await).map(|_| pb::Empty::new())
    }

    async fn destroy_sandbox(
        &self,
        _: &TtrpcContext,
        req: pb::DestroySandboxRequest,
    ) -> R<pb::Empty> {
        log(
            "DestroySandbox",
            self.agent.destroy_sandbox(req.timeout_ms).await,
        )
        .map(|_| pb::Empty::new())
    }
}

#[async_trait]
impl svc::Containers for Services {
    async fn create_container(
        &self,
        _: &TtrpcContext,
        req: pb::CreateContainerRequest,
    ) -> R<pb::Empty> {
        log("CreateContainer", self.agent.create_container(&req).await).map(|_| pb::Empty::new())
    }

    async fn start_container(&self, _: &TtrpcContext, req: pb::ContainerRequest) -> R<pb::Empty> {
        log(
            "StartContainer",
            self.agent.start_container(&req.container_id).await,
        )
        .map(|_| pb::Empty::new())
    }

    async fn exec_process(&self, _: &TtrpcContext, req: pb::ExecProcessRequest) -> R<pb::Empty> {
        log("ExecProcess", self.agent.exec_process(&req).await).map(|_| pb::Empty::new())
    }

    async fn signal_process(
        &self,
        _: &TtrpcContext,
        req: pb::SignalProcessRequest,
    ) -> R<pb::Empty> {
        log("SignalProcess", self.agent.signal_process(&req).await).map(|_| pb::Empty::new())
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: pb::ProcessRequest,
    ) -> R<pb::WaitProcessResponse> {
        let (e, oom_seq) = log(
            "WaitProcess",
            self.agent
                .wait_process(&req.container_id, &req.exec_id)
                .await,
        )?;
        let mut r = pb::WaitProcessResponse::new();
        r.oom_seq = oom_seq;
        r.exit_status = e.status;
        r.signal = e.signal;
        r.exited_at_unix_nanos =
            e.at.duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as i64)
                .unwrap_or(0);
        Ok(r)
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        req: pb::RemoveContainerRequest,
    ) -> R<pb::Empty> {
        log(
            "RemoveContainer",
            self.agent
                .remove_container(&req.container_id, req.timeout_ms)
                .await,
        )
        .map(|_| pb::Empty::new())
    }

    async fn update_container(
        &self,
        _: &TtrpcContext,
        req: pb::UpdateContainerRequest,
    ) -> R<pb::Empty> {
        log(
            "UpdateContainer",
            self.agent
                .update_container(&req.container_id, &req.resources_json)
                .await,
        )
        .map(|_| pb::Empty::new())
    }

    async fn stats_container(
        &self,
        _: &TtrpcContext,
        req: pb::ContainerRequest,
    ) -> R<pb::StatsContainerResponse> {
        log(
            "StatsContainer",
            self.agent.stats_container(&req.container_id).await,
        )
    }

    async fn pause_container(&self, _: &TtrpcContext, req: pb::ContainerRequest) -> R<pb::Empty> {
        log(
            "PauseContainer",
            self.agent.pause_container(&req.container_id, true).await,
        )
        .map(|_| pb::Empty::new())
    }

    async fn resume_container(&self, _: &TtrpcContext, req: pb::ContainerRequest) -> R<pb::Empty> {
        log(
            "ResumeContainer",
            self.agent.pause_container(&req.container_id, false).await,
        )
        .map(|_| pb::Empty::new())
    }

    async fn list_processes(
        &self,
        _: &TtrpcContext,
        req: pb::ContainerRequest,
    ) -> R<pb::ListProcessesResponse> {
        let pids = log(
            "ListProcesses",
            self.agent.list_processes(&req.container_id).await,
        )?;
        let mut r = pb::ListProcessesResponse::new();
        r.pids = pids;
        Ok(r)
    }
}

#[async_trait]
impl svc::Io for Services {
    async fn write_stdin(
        &self,
        _: &TtrpcContext,
        req: pb::WriteStdinRequest,
    ) -> R<pb::WriteStdinResponse> {
        log(
            "WriteStdin",
            self.agent
                .write_stdin(&req.container_id, &req.exec_id, &req.data)
                .await,
        )?;
        let mut r = pb::WriteStdinResponse::new();
        r.written = req.data.len() as u32;
        Ok(r)
    }

    async fn close_stdin(&self, _: &TtrpcContext, req: pb::ProcessRequest) -> R<pb::Empty> {
        log(
            "CloseStdin",
            self.agent
                .close_stdin(&req.container_id, &req.exec_id)
                .await,
        )
        .map(|_| pb::Empty::new())
    }

    async fn read_stdout(
        &self,
        _: &TtrpcContext,
        req: pb::ReadStreamRequest,
    ) -> R<pb::ReadStreamResponse> {
        self.read(req, false).await
    }

    async fn read_stderr(
        &self,
        _: &TtrpcContext,
        req: pb::ReadStreamRequest,
    ) -> R<pb::ReadStreamResponse> {
        self.read(req, true).await
    }

    async fn tty_win_resize(&self, _: &TtrpcContext, req: pb::TtyWinResizeRequest) -> R<pb::Empty> {
        log(
            "TtyWinResize",
            self.agent
                .resize_tty(&req.container_id, &req.exec_id, req.rows, req.columns),
        )
        .map(|_| pb::Empty::new())
    }
}

impl Services {
    async fn read(&self, req: pb::ReadStreamRequest, stderr: bool) -> R<pb::ReadStreamResponse> {
        let what = if stderr { "ReadStderr" } else { "ReadStdout" };
        let (data, eof) = log(
            what,
            self.agent
                .read_output(&req.container_id, &req.exec_id, stderr, req.max_bytes)
                .await,
        )?;
        let mut r = pb::ReadStreamResponse::new();
        r.data = data;
        r.eof = eof;
        Ok(r)
    }
}

#[async_trait]
impl svc::Events for Services {
    async fn get_oom_event(&self, _: &TtrpcContext, _: pb::Empty) -> R<pb::OOMEvent> {
        let mut r = pb::OOMEvent::new();
        (r.seq, r.container_id) = self.agent.next_oom_event().await;
        Ok(r)
    }
}

#[async_trait]
impl svc::Network for Services {
    async fn update_interface(
        &self,
        _: &TtrpcContext,
        req: pb::UpdateInterfaceRequest,
    ) -> R<pb::Interface> {
        let r = async {
            let iface = req.interface.as_ref().ok_or_else(|| {
                crate::AgentError::InvalidArgument(
                    "interface is missing: give at least its hw_addr".into(),
                )
            })?;
            Ok(self.agent.net().await?.update_interface(iface).await?)
        };
        log("UpdateInterface", r.await)
    }

    async fn update_routes(&self, _: &TtrpcContext, req: pb::UpdateRoutesRequest) -> R<pb::Routes> {
        let r = async { Ok(self.agent.net().await?.update_routes(&req.routes).await?) };
        let mut out = pb::Routes::new();
        out.routes = log("UpdateRoutes", r.await)?;
        Ok(out)
    }

    async fn add_arp_neighbors(
        &self,
        _: &TtrpcContext,
        req: pb::AddARPNeighborsRequest,
    ) -> R<pb::Empty> {
        let r = async {
            Ok(self
                .agent
                .net()
                .await?
                .add_neighbors(&req.neighbors)
                .await?)
        };
        log("AddARPNeighbors", r.await).map(|_| pb::Empty::new())
    }

    async fn list_interfaces(&self, _: &TtrpcContext, _: pb::Empty) -> R<pb::Interfaces> {
        let r = async { Ok(self.agent.net().await?.list_interfaces().await?) };
        let mut out = pb::Interfaces::new();
        out.interfaces = log("ListInterfaces", r.await)?;
        Ok(out)
    }

    async fn list_routes(&self, _: &TtrpcContext, _: pb::Empty) -> R<pb::Routes> {
        let r = async { Ok(self.agent.net().await?.list_routes().await?) };
        let mut out = pb::Routes::new();
        out.routes = log("ListRoutes", r.await)?;
        Ok(out)
    }
}
