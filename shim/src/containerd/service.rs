//! The Task service containerd calls (`containerd.task.v2.Task`; the crate generates it as
//! `v3`, the same messages under containerd 2's name, and [`super::bootstrap`] registers it
//! under both). Every method is implemented here: none may fall to the generated default,
//! which answers NOT_FOUND and makes containerd think the task is gone. Checkpoint answers
//! UNIMPLEMENTED explicitly.
//!
//! This layer keeps containerd's view ([`Tasks`]), opens the FIFOs, publishes the events,
//! and leaves the pod itself to a [`PodRuntime`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use containerd_shim::protos::api::{self, Status};
use containerd_shim::protos::events::task as ev;
use containerd_shim::protos::ttrpc;
use containerd_shim::ExitSignal;
use tokio::sync::Mutex;

use super::config::Config;
use super::error::{Error, Result};
use super::events::Publisher;
use super::oom_order::{OomOrder, OOM_WAIT};
use super::options::RuntimeOptions;
use super::runtime::OomEvent;
use super::runtime::{ContainerRequest, ExecRequest, PodRuntime, RootfsMount, SandboxRequest};
use super::stdio::{Pumps, StdioPaths};
use super::tasks::{kind_of, Container, Exit, Kind, Process, Tasks};

/// How long a process's output may take to reach EOF after the process exited before its
/// FIFOs are closed anyway: a background child holding the pipe must not hang ExecSync.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// The task service of one pod's shim.
pub struct TaskService<R: PodRuntime> {
    pub(super) runtime: Arc<R>,
    pub(super) tasks: Arc<Mutex<Tasks>>,
    pub(super) publisher: Arc<Publisher>,
    pub(super) namespace: String,
    pub(super) exit: Arc<ExitSignal>,
    /// The config from `start`'s runtime options (replaced by CreateTaskRequest.options).
    config: Mutex<Option<Config>>,
    /// The pid containerd sees for every task: the VMM's, once the sandbox is up.
    pod_pid: Mutex<u32>,
    /// Keeps TaskOOM before the TaskExit of the task it killed.
    oom_order: Arc<OomOrder>,
}

pub(super) fn ttrpc_err(e: Error) -> ttrpc::Error {
    tracing::warn!("{e}");
    e.into()
}

fn read_spec(bundle: &Path) -> Result<serde_json::Value> {
    let p = bundle.join("config.json");
    let text = std::fs::read(&p).map_err(|e| Error::io(format!("read {}", p.display()), e))?;
    serde_json::from_slice(&text)
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", p.display())))
}

impl<R: PodRuntime> TaskService<R> {
    pub fn new(
        runtime: R,
        publisher: Publisher,
        namespace: &str,
        exit: Arc<ExitSignal>,
        config: Option<Config>,
    ) -> Self {
        TaskService {
            runtime: Arc::new(runtime),
            tasks: Arc::default(),
            publisher: Arc::new(publisher),
            namespace: namespace.into(),
            exit,
            config: Mutex::new(config),
            pod_pid: Mutex::new(0),
            oom_order: Arc::default(),
        }
    }

    async fn config_for(
        &self,
        options: Option<&containerd_shim::protos::protobuf::well_known_types::any::Any>,
    ) -> Result<Config> {
        if let Some(o) = options.map(RuntimeOptions::from_any).transpose()?.flatten() {
            let c = Config::load(Some(&o.config_path))?;
            *self.config.lock().await = Some(c.clone());
            return Ok(c);
        }
        if let Some(c) = self.config.lock().await.clone() {
            return Ok(c);
        }
        let c = Config::load(None)?;
        *self.config.lock().await = Some(c.clone());
        Ok(c)
    }

    pub(super) async fn do_create(
        &self,
        req: api::CreateTaskRequest,
    ) -> Result<api::CreateTaskResponse> {
        if !req.checkpoint.is_empty() {
            return Err(Error::Unimplemented("restore from a checkpoint"));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = read_spec(&bundle)?;
        let (kind, sandbox_id) = kind_of(&spec, &req.id);
        let config = self.config_for(req.options.as_ref()).await?;
        let rootfs: Vec<RootfsMount> = req
            .rootfs
            .iter()
            .map(|m| RootfsMount {
                kind: m.type_.clone(),
                source: m.source.clone(),
                target: m.target.clone(),
                options: m.options.clone(),
            })
            .collect();
        {
            let tasks = self.tasks.lock().await;
            if tasks.get(&req.id).is_ok() {
                return Err(Error::AlreadyExists(format!("task {}", req.id)));
            }
            if kind == Kind::Container && !tasks.has_sandbox() {
                return Err(Error::FailedPrecondition(format!(
                    "container {} joins sandbox {sandbox_id}, which this shim does not run",
                    req.id
                )));
            }
        }
        if kind == Kind::Sandbox {
            let pid = self
                .runtime
                .create_sandbox(SandboxRequest {
                    id: req.id.clone(),
                    namespace: self.namespace.clone(),
                    bundle: bundle.clone(),
                    spec: spec.clone(),
                    config,
                })
                .await?;
            *self.pod_pid.lock().await = pid;
            self.spawn_oom_watcher();
        }
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let created = self
            .runtime
            .create_container(ContainerRequest {
                id: req.id.clone(),
                bundle: bundle.clone(),
                spec,
                rootfs: rootfs.clone(),
                stdin: !req.stdin.is_empty(),
                terminal: req.terminal,
            })
            .await;
        if let Err(e) = created {
            if kind == Kind::Sandbox {
                // A sandbox whose first container failed is not left booted.
                let _ = self.runtime.stop_sandbox().await;
            }
            return Err(e);
        }
        let pid = *self.pod_pid.lock().await;
        self.tasks.lock().await.insert(Container {
            id: req.id.clone(),
            bundle,
            kind,
            rootfs: rootfs.clone(),
            init: Process::new("", stdio, pid),
            execs: Default::default(),
        })?;
        self.publisher
            .publish(ev::TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: Some(ev::TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                })
                .into(),
                pid,
                ..Default::default()
            })
            .await;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    pub(super) async fn do_start(&self, req: api::StartRequest) -> Result<api::StartResponse> {
        let (stdio, pid) = {
            let tasks = self.tasks.lock().await;
            let p = tasks.get(&req.id)?.process(&req.exec_id)?;
            if p.status != Status::CREATED {
                return Err(Error::FailedPrecondition(format!(
                    "{} {}: already started",
                    req.id, req.exec_id
                )));
            }
            (p.stdio.clone(), p.pid)
        };
        let io = self.runtime.start(&req.id, &req.exec_id).await?;
        let pumps = Pumps::start(&stdio, io)
            .await
            .map_err(|e| Error::io("open the process's stdio", e))?;
        {
            let mut tasks = self.tasks.lock().await;
            let p = tasks.get_mut(&req.id)?.process_mut(&req.exec_id)?;
            p.status = Status::RUNNING;
            p.pumps = Some(pumps);
        }
        // Published before the exit waiter exists, so start always precedes exit.
        if req.exec_id.is_empty() {
            self.publisher
                .publish(ev::TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                })
                .await;
        } else {
            self.publisher
                .publish(ev::TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid,
                    ..Default::default()
                })
                .await;
        }
        self.spawn_exit_waiter(req.id.clone(), req.exec_id.clone(), pid);
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    /// Waits for the process in the sandbox, lets its output drain into the FIFOs (then
    /// closes them), records the exit and publishes TaskExit.
    fn spawn_exit_waiter(&self, id: String, exec_id: String, pid: u32) {
        let runtime = self.runtime.clone();
        let tasks = self.tasks.clone();
        let publisher = self.publisher.clone();
        let oom_order = self.oom_order.clone();
        tokio::spawn(async move {
            let (code, oom_seq) = match runtime.wait(&id, &exec_id).await {
                Ok(s) => (s.code, s.oom_seq),
                Err(e) => {
                    tracing::warn!(%id, %exec_id, "wait failed, reporting 255: {e}");
                    (255, 0)
                }
            };
            let exit = Exit {
                status: code,
                at: SystemTime::now(),
            };
            let pumps = {
                let mut t = tasks.lock().await;
                t.get_mut(&id)
                    .and_then(|c| c.process_mut(&exec_id))
                    .ok()
                    .and_then(|p| p.pumps.take())
            };
            if let Some(mut pumps) = pumps {
                if tokio::time::timeout(DRAIN_GRACE, pumps.drained())
                    .await
                    .is_err()
                {
                    tracing::warn!(%id, %exec_id, "output still open {DRAIN_GRACE:?} after exit; closing the FIFOs");
                }
                // Dropping the pumps closes every FIFO writer: containerd gets its EOF.
            }
            // An OOM kill that ended it is published first.
            if !oom_order.wait_for(oom_seq, OOM_WAIT).await {
                tracing::warn!(%id, %exec_id, oom_seq, "OOM events before this exit not published within {OOM_WAIT:?}");
            }
            let ts = exit.timestamp();
            if let Ok(p) = tasks
                .lock()
                .await
                .get_mut(&id)
                .and_then(|c| c.process_mut(&exec_id))
            {
                p.set_exited(exit);
            }
            publisher
                .publish(ev::TaskExit {
                    container_id: id.clone(),
                    id: if exec_id.is_empty() {
                        id.clone()
                    } else {
                        exec_id.clone()
                    },
                    pid,
                    exit_status: code,
                    exited_at: Some(ts).into(),
                    ..Default::default()
                })
                .await;
        });
    }

    pub(super) async fn do_delete(&self, req: api::DeleteRequest) -> Result<api::DeleteResponse> {
        if !req.exec_id.is_empty() {
            let mut tasks = self.tasks.lock().await;
            let c = tasks.get_mut(&req.id)?;
            let p = c.process(&req.exec_id)?;
            if p.status == Status::RUNNING {
                return Err(Error::FailedPrecondition(format!(
                    "exec {} of {} is still running",
                    req.exec_id, req.id
                )));
            }
            let exit = p.exit();
            let pid = p.pid;
            c.execs.remove(&req.exec_id);
            return Ok(delete_response(pid, exit));
        }
        let (kind, pid, exit, status) = {
            let tasks = self.tasks.lock().await;
            let c = tasks.get(&req.id)?;
            (c.kind, c.init.pid, c.init.exit(), c.init.status)
        };
        if status == Status::RUNNING || status == Status::PAUSED {
            return Err(Error::FailedPrecondition(format!(
                "task {} is still running",
                req.id
            )));
        }
        // Removal in the VM and the rootfs unmount happen before we answer: `ctr run --rm`
        // removes the snapshot right after.
        self.runtime.delete_container(&req.id).await?;
        let removed = self.tasks.lock().await.remove(&req.id);
        drop(removed);
        if kind == Kind::Sandbox {
            self.runtime.stop_sandbox().await?;
        }
        let resp = delete_response(pid, exit.clone());
        self.publisher
            .publish(ev::TaskDelete {
                container_id: req.id.clone(),
                id: req.id.clone(),
                pid,
                exit_status: resp.exit_status,
                exited_at: resp.exited_at.clone(),
                ..Default::default()
            })
            .await;
        Ok(resp)
    }

    pub(super) async fn do_exec(&self, req: api::ExecProcessRequest) -> Result<()> {
        let process: serde_json::Value = match req.spec.as_ref() {
            Some(any) => serde_json::from_slice(&any.value)
                .map_err(|e| Error::InvalidArgument(format!("exec spec: {e}")))?,
            None => return Err(Error::InvalidArgument("exec without a process spec".into())),
        };
        let pid = {
            let tasks = self.tasks.lock().await;
            let c = tasks.get(&req.id)?;
            if c.init.status != Status::RUNNING {
                return Err(Error::FailedPrecondition(format!(
                    "task {} is not running",
                    req.id
                )));
            }
            if c.execs.contains_key(&req.exec_id) {
                return Err(Error::AlreadyExists(format!("exec {}", req.exec_id)));
            }
            c.init.pid
        };
        self.runtime
            .exec(ExecRequest {
                container: req.id.clone(),
                exec_id: req.exec_id.clone(),
                process,
                stdin: !req.stdin.is_empty(),
                terminal: req.terminal,
            })
            .await?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        self.tasks
            .lock()
            .await
            .get_mut(&req.id)?
            .execs
            .insert(req.exec_id.clone(), Process::new(&req.exec_id, stdio, pid));
        self.publisher
            .publish(ev::TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            })
            .await;
        Ok(())
    }

    pub(super) async fn do_state(&self, req: api::StateRequest) -> Result<api::StateResponse> {
        let tasks = self.tasks.lock().await;
        let c = tasks.get(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let exit = p.exit();
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.to_string_lossy().into_owned(),
            pid: p.pid,
            status: p.status.into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.as_ref().map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| e.timestamp()).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    pub(super) async fn do_wait(&self, req: api::WaitRequest) -> Result<api::WaitResponse> {
        let mut rx = {
            let tasks = self.tasks.lock().await;
            tasks.get(&req.id)?.process(&req.exec_id)?.exit_watch()
        };
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::NotFound(format!("task {} was deleted", req.id)))?
            .clone()
            .expect("waited for Some");
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: Some(exit.timestamp()).into(),
            ..Default::default()
        })
    }

    pub(super) async fn set_paused(&self, id: &str, paused: bool) -> Result<()> {
        self.tasks.lock().await.get(id)?;
        if paused {
            self.runtime.pause(id).await?;
        } else {
            self.runtime.resume(id).await?;
        }
        if let Ok(c) = self.tasks.lock().await.get_mut(id) {
            c.init.status = if paused {
                Status::PAUSED
            } else {
                Status::RUNNING
            };
        }
        if paused {
            self.publisher
                .publish(ev::TaskPaused {
                    container_id: id.into(),
                    ..Default::default()
                })
                .await;
        } else {
            self.publisher
                .publish(ev::TaskResumed {
                    container_id: id.into(),
                    ..Default::default()
                })
                .await;
        }
        Ok(())
    }

    /// Forwards the guest's OOM kills as TaskOOM (CRI then reports reason `OOMKilled`)
    /// until the pod's VM is gone.
    fn spawn_oom_watcher(&self) {
        let runtime = self.runtime.clone();
        let tasks = self.tasks.clone();
        let publisher = self.publisher.clone();
        let oom_order = self.oom_order.clone();
        tokio::spawn(async move {
            loop {
                let OomEvent { container: id, seq } = match runtime.oom_event().await {
                    Ok(ev) => ev,
                    Err(e) => {
                        tracing::debug!("OOM watcher ends: {e}");
                        return;
                    }
                };
                if tasks.lock().await.get(&id).is_err() {
                    tracing::debug!(%id, "OOM in a container containerd does not know");
                } else {
                    tracing::info!(%id, "OOM kill in the guest");
                    publisher
                        .publish(ev::TaskOOM {
                            container_id: id,
                            ..Default::default()
                        })
                        .await;
                }
                oom_order.published(seq);
            }
        });
    }
}

fn delete_response(pid: u32, exit: Option<Exit>) -> api::DeleteResponse {
    api::DeleteResponse {
        pid,
        exit_status: exit.as_ref().map(|e| e.status).unwrap_or(0),
        exited_at: exit.map(|e| e.timestamp()).into(),
        ..Default::default()
    }
}
