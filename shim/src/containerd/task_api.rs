//! The generated `Task` trait on [`TaskService`]: each method maps our errors to the ttrpc
//! statuses containerd acts on and calls the service's logic. All 17 methods are here, so
//! none falls to the generated default (NOT_FOUND); Checkpoint is UNIMPLEMENTED.

use async_trait::async_trait;
use containerd_shim::protos::api::{self, Empty, Status};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::ttrpc::{self, r#async::TtrpcContext};

use super::error::{Error, Result};
use super::runtime::PodRuntime;
use super::service::{ttrpc_err, TaskService};

#[async_trait]
impl<R: PodRuntime> Task for TaskService<R> {
    async fn state(
        &self,
        _: &TtrpcContext,
        req: api::StateRequest,
    ) -> ttrpc::Result<api::StateResponse> {
        self.do_state(req).await.map_err(ttrpc_err)
    }

    async fn create(
        &self,
        _: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> ttrpc::Result<api::CreateTaskResponse> {
        self.do_create(req).await.map_err(ttrpc_err)
    }

    async fn start(
        &self,
        _: &TtrpcContext,
        req: api::StartRequest,
    ) -> ttrpc::Result<api::StartResponse> {
        self.do_start(req).await.map_err(ttrpc_err)
    }

    async fn delete(
        &self,
        _: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> ttrpc::Result<api::DeleteResponse> {
        self.do_delete(req).await.map_err(ttrpc_err)
    }

    async fn pids(
        &self,
        _: &TtrpcContext,
        req: api::PidsRequest,
    ) -> ttrpc::Result<api::PidsResponse> {
        let r: Result<_> = async {
            self.tasks.lock().await.get(&req.id)?;
            let pids = self.runtime.pids(&req.id).await?;
            Ok(api::PidsResponse {
                processes: pids
                    .into_iter()
                    .map(|pid| api::ProcessInfo {
                        pid,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        }
        .await;
        r.map_err(ttrpc_err)
    }

    async fn pause(&self, _: &TtrpcContext, req: api::PauseRequest) -> ttrpc::Result<Empty> {
        self.set_paused(&req.id, true).await.map_err(ttrpc_err)?;
        Ok(Empty::new())
    }

    async fn resume(&self, _: &TtrpcContext, req: api::ResumeRequest) -> ttrpc::Result<Empty> {
        self.set_paused(&req.id, false).await.map_err(ttrpc_err)?;
        Ok(Empty::new())
    }

    async fn checkpoint(
        &self,
        _: &TtrpcContext,
        _: api::CheckpointTaskRequest,
    ) -> ttrpc::Result<Empty> {
        Err(Error::Unimplemented("Checkpoint").into())
    }

    async fn kill(&self, _: &TtrpcContext, req: api::KillRequest) -> ttrpc::Result<Empty> {
        let r: Result<()> = async {
            let status = {
                let tasks = self.tasks.lock().await;
                tasks.get(&req.id)?.process(&req.exec_id)?.status
            };
            if status == Status::STOPPED {
                // runc's shim answers NotFound for a dead process; containerd treats that
                // as done. Say it the same way.
                return Err(Error::NotFound(format!(
                    "process {} {} already exited",
                    req.id, req.exec_id
                )));
            }
            self.runtime
                .kill(&req.id, &req.exec_id, req.signal, req.all)
                .await
        }
        .await;
        r.map_err(ttrpc_err)?;
        Ok(Empty::new())
    }

    async fn exec(&self, _: &TtrpcContext, req: api::ExecProcessRequest) -> ttrpc::Result<Empty> {
        self.do_exec(req).await.map_err(ttrpc_err)?;
        Ok(Empty::new())
    }

    async fn resize_pty(
        &self,
        _: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> ttrpc::Result<Empty> {
        let r: Result<()> = async {
            self.tasks
                .lock()
                .await
                .get(&req.id)?
                .process(&req.exec_id)?;
            self.runtime
                .resize_pty(&req.id, &req.exec_id, req.width, req.height)
                .await
        }
        .await;
        r.map_err(ttrpc_err)?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _: &TtrpcContext, req: api::CloseIORequest) -> ttrpc::Result<Empty> {
        let r: Result<()> = async {
            if !req.stdin {
                return Ok(());
            }
            if let Some(p) = self
                .tasks
                .lock()
                .await
                .get_mut(&req.id)?
                .process_mut(&req.exec_id)?
                .pumps
                .as_mut()
            {
                p.close_stdin();
            }
            self.runtime.close_stdin(&req.id, &req.exec_id).await
        }
        .await;
        r.map_err(ttrpc_err)?;
        Ok(Empty::new())
    }

    async fn update(&self, _: &TtrpcContext, req: api::UpdateTaskRequest) -> ttrpc::Result<Empty> {
        let r: Result<()> = async {
            self.tasks.lock().await.get(&req.id)?;
            let resources = req
                .resources
                .as_ref()
                .map(|a| a.value.clone())
                .unwrap_or_default();
            self.runtime.update(&req.id, &resources).await
        }
        .await;
        r.map_err(ttrpc_err)?;
        Ok(Empty::new())
    }

    async fn wait(
        &self,
        _: &TtrpcContext,
        req: api::WaitRequest,
    ) -> ttrpc::Result<api::WaitResponse> {
        self.do_wait(req).await.map_err(ttrpc_err)
    }

    async fn stats(
        &self,
        _: &TtrpcContext,
        req: api::StatsRequest,
    ) -> ttrpc::Result<api::StatsResponse> {
        let r: Result<_> = async {
            self.tasks.lock().await.get(&req.id)?;
            let stats = self.runtime.stats(&req.id).await?;
            Ok(api::StatsResponse {
                stats: Some(stats).into(),
                ..Default::default()
            })
        }
        .await;
        r.map_err(ttrpc_err)
    }

    async fn connect(
        &self,
        _: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> ttrpc::Result<api::ConnectResponse> {
        let task_pid = match self.tasks.lock().await.get(&req.id) {
            Ok(c) => c.init.pid,
            Err(e) => return Err(ttrpc_err(e)),
        };
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _: &TtrpcContext, _req: api::ShutdownRequest) -> ttrpc::Result<Empty> {
        // containerd calls Shutdown after every task Delete; the shim serves the whole pod
        // and leaves only when it holds no task.
        if !self.tasks.lock().await.is_empty() {
            return Ok(Empty::new());
        }
        if let Err(e) = self.runtime.stop_sandbox().await {
            tracing::warn!("stop the sandbox at shutdown: {e}");
        }
        self.exit.signal();
        Ok(Empty::new())
    }
}
