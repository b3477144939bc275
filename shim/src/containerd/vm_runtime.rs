//! [`PodRuntime`] on the sandbox layer ([`Sandbox`]: the VM's processes owned by pidfd,
//! state on disk for a cleanup from a fresh process, the agent).
//!
//! The sandbox's Create boots a [`Sandbox`] (husk-vmm + one virtiofsd exporting the pod's
//! shared directory `<run root>/share/<sandbox id>`). Each container's rootfs is mounted on
//! `<bundle>/rootfs` and bind-mounted into the share; host bind mounts of its spec go the
//! same way. What the sandbox layer's state does not know (the share and the container
//! mounts on the host) is kept in [`sandbox_state`]'s file, for a `delete` after the shim
//! was killed. The pod's CNI network is carried into the VM by
//! [`crate::sandbox::pod_network`]; the pod's host cgroup by [`crate::sandbox::host_cgroup`].

mod agent_stdio;
mod share;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::protos::cgroups_v2::metrics as m2;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use husk_proto::agent as pb;
use tokio::sync::Mutex;

use super::error::{Error, Result};
use super::pod_spec;
use super::runtime::{
    ContainerRequest, ExecRequest, ExitStatus, OomEvent, PodRuntime, SandboxRequest,
};
use super::sandbox_state::{self, SandboxState};
use super::stdio::ProcessIo;
use crate::sandbox::pod_network;
use crate::sandbox::vm::{ShareSpec, VmSpec};
use crate::sandbox::{Sandbox, SandboxConfig};
use agent_stdio::{output_reader, stdin_writer};
use husk_agent_client::{ctx, Agent};
pub(super) use share::remove_share;
use share::{share_container, unmount_all};

/// The virtio-fs tag of the pod's shared directory.
const SHARE_TAG: &str = "pod";

/// The sandbox layer's id for containerd's sandbox `id`: ids become socket names, and the
/// first 32 characters of containerd's (64 hex digits from CRI) are unique enough.
pub fn sandbox_vm_id(id: &str) -> String {
    id.chars().take(32).collect()
}

/// The booted pod.
struct Pod {
    sandbox: Sandbox,
    share: PathBuf,
    call_timeout: Duration,
    /// Host mount points per container, unmounted in reverse order at delete.
    mounts: HashMap<String, Vec<PathBuf>>,
    /// Exec processes registered and not yet started.
    pending_execs: HashMap<(String, String), ExecRequest>,
    /// What `delete` must remove if this shim dies, and where it is kept.
    state: SandboxState,
    state_path: PathBuf,
}

impl Pod {
    /// Rewrites the state file with the mounts held now.
    fn save_state(&mut self) {
        self.state.mounts = self.mounts.values().flatten().cloned().collect();
        if let Err(e) = self.state.save(&self.state_path) {
            tracing::warn!("{e}");
        }
    }
}

/// [`PodRuntime`] on `Vm` + `Agent`.
#[derive(Default)]
pub struct VmRuntime {
    pod: Mutex<Option<Pod>>,
}

impl VmRuntime {
    pub fn new() -> VmRuntime {
        VmRuntime::default()
    }
}

fn agent_err(call: &'static str, e: husk_proto::ttrpc::Error) -> Error {
    if let husk_proto::ttrpc::Error::RpcStatus(s) = &e {
        if s.code() == husk_proto::ttrpc::Code::NOT_FOUND {
            return Error::NotFound(format!("agent {call}: {}", s.message()));
        }
    }
    Error::Agent(husk_agent_client::AgentError::call(call, e))
}

/// Tells huskd where the VM's hybrid vsock socket is (`<bundle>/husk-vsock-address`), for
/// its port-forward streams to the agent: huskd connects there itself rather than through
/// us, so forwarded bytes take no extra hop and we hold no per-connection state. Written
/// once the pod's network is in place, atomically (a reader never sees half a path); it
/// goes with the bundle. A failure costs only port-forward, so it is logged, not fatal.
fn publish_vsock_address(bundle: &Path, uds: &Path) {
    let file = bundle.join(husk_proto::VSOCK_ADDRESS_FILE);
    let tmp = bundle.join(format!(".{}.tmp", husk_proto::VSOCK_ADDRESS_FILE));
    let r = std::fs::write(&tmp, uds.as_os_str().as_encoded_bytes())
        .and_then(|()| std::fs::rename(&tmp, &file));
    if let Err(e) = r {
        tracing::warn!(path = %file.display(), "publish the vsock address: {e}");
    }
}

impl VmRuntime {
    async fn agent(&self) -> Result<(Agent, Duration)> {
        let pod = self.pod.lock().await;
        let p = pod
            .as_ref()
            .ok_or_else(|| Error::FailedPrecondition("the pod's VM is not running".into()))?;
        if let Some(e) = p.sandbox.vm().vmm_exit() {
            return Err(Error::FailedPrecondition(format!(
                "the pod's VM is gone: {e}"
            )));
        }
        Ok((p.sandbox.agent().clone(), p.call_timeout))
    }
}

#[async_trait]
impl PodRuntime for VmRuntime {
    async fn create_sandbox(&self, req: SandboxRequest) -> Result<u32> {
        let mut slot = self.pod.lock().await;
        if slot.is_some() {
            return Err(Error::AlreadyExists(format!("sandbox {}", req.id)));
        }
        let c = &req.config;
        let guest = crate::paths::guest_dir();
        let pick = |p: &PathBuf, name: &str| {
            if p.as_os_str().is_empty() {
                guest.join(name)
            } else {
                p.clone()
            }
        };
        let mut spec = VmSpec::pod(
            pick(&c.kernel, "vmlinux"),
            pick(&c.initramfs, "husk-initramfs.cpio"),
        );
        if !c.kernel_params.is_empty() {
            spec.cmdline = format!("{} {}", spec.cmdline, c.kernel_params);
        }
        (spec.vcpus, spec.mem_mib) = pod_spec::vm_size(&req.spec, &c.vm);
        spec.jail = c.vm.jail;
        if !c.vmm.as_os_str().is_empty() {
            spec.vmm_bin = Some(c.vmm.clone());
        }
        // The CNI netns (CRI pods): its interfaces become the VM's NICs.
        let net = match pod_spec::netns_path(&req.spec) {
            Some(ns) => Some(
                tokio::task::spawn_blocking(move || pod_network::discover(&ns))
                    .await
                    .map_err(|e| Error::Other(format!("the netns task failed: {e}")))??,
            ),
            None => None,
        };
        spec.nets = net.as_ref().map(|n| n.nets()).unwrap_or_default();
        let vm_id = sandbox_vm_id(&req.id);
        let share = crate::paths::run_root().join("share").join(&vm_id);
        std::fs::create_dir_all(&share)
            .map_err(|e| Error::io(format!("create {}", share.display()), e))?;
        spec.shares.push(ShareSpec {
            tag: SHARE_TAG.into(),
            dir: share.clone(),
            readonly: false,
        });
        let cfg = SandboxConfig {
            id: vm_id,
            hostname: req.spec["hostname"].as_str().unwrap_or("").to_string(),
            vm: spec,
            boot_timeout: c.timeouts.agent_connect(),
            // No netns in the spec (plain `ctr run`): the sandbox gets one of its own.
            own_netns: net.is_none(),
            cgroups_path: req.spec["linux"]["cgroupsPath"]
                .as_str()
                .map(str::to_string),
        };
        let sandbox = match Sandbox::create(cfg).await {
            Ok(sb) => sb,
            Err(e) => {
                let _ = std::fs::remove_dir(&share);
                return Err(e.into());
            }
        };
        if let Some(net) = &net {
            let joined = pod_network::attach(sandbox.agent(), net, c.timeouts.agent_call()).await;
            if let Err(e) = joined {
                if let Err(s) = sandbox.shutdown().await {
                    tracing::warn!("sandbox shutdown: {s}");
                }
                remove_share(&share);
                return Err(e.into());
            }
        }
        let pid = sandbox.vm().vmm_pid().unwrap_or(0) as u32;
        // The sandbox layer records the VM's processes; the share and the mounts in it are
        // ours. Recorded before anything else can fail: a shim killed from here on leaves a
        // state file for `delete`.
        let vm_dir = sandbox.dir().to_path_buf();
        let mut processes: Vec<_> = sandbox_state::proc_of(pid).into_iter().collect();
        for p in sandbox_state::processes_mentioning(&vm_dir.to_string_lossy()) {
            if !processes.iter().any(|q| q.pid == p.pid) {
                processes.push(p);
            }
        }
        let state = SandboxState {
            sandbox_id: req.id.clone(),
            processes,
            vm_dir,
            share: share.clone(),
            mounts: Vec::new(),
        };
        let state_path = sandbox_state::path(&req.namespace, &req.id);
        if let Err(e) = state.save(&state_path) {
            tracing::warn!("{e}");
        }
        publish_vsock_address(&req.bundle, sandbox.vm().vsock_uds());
        *slot = Some(Pod {
            sandbox,
            share,
            call_timeout: c.timeouts.agent_call(),
            mounts: HashMap::new(),
            pending_execs: HashMap::new(),
            state,
            state_path,
        });
        Ok(pid)
    }

    async fn create_container(&self, req: ContainerRequest) -> Result<()> {
        let mut spec = req.spec.clone();
        let binds = pod_spec::for_guest(&mut spec);
        let (agent, timeout, share) = {
            let pod = self.pod.lock().await;
            let p = pod
                .as_ref()
                .ok_or_else(|| Error::FailedPrecondition("no pod VM".into()))?;
            (p.sandbox.agent().clone(), p.call_timeout, p.share.clone())
        };
        let (points, mounts) = share_container(&share, &req, &binds)?;
        let mut r = pb::CreateContainerRequest::new();
        r.container_id = req.id.clone();
        r.oci_spec_json = serde_json::to_vec(&spec).map_err(|e| Error::Other(e.to_string()))?;
        let mut root = pb::RootfsSource::new();
        root.share_tag = SHARE_TAG.into();
        root.path = format!("{}/rootfs", req.id);
        r.rootfs = Some(root).into();
        r.mounts = mounts;
        r.stdin = req.stdin;
        if let Err(e) = agent.containers.create_container(ctx(timeout), &r).await {
            unmount_all(&points);
            return Err(agent_err("CreateContainer", e));
        }
        if let Some(p) = self.pod.lock().await.as_mut() {
            p.mounts.insert(req.id.clone(), points);
            p.save_state();
        }
        Ok(())
    }

    async fn exec(&self, req: ExecRequest) -> Result<()> {
        let mut pod = self.pod.lock().await;
        let p = pod
            .as_mut()
            .ok_or_else(|| Error::FailedPrecondition("no pod VM".into()))?;
        p.pending_execs
            .insert((req.container.clone(), req.exec_id.clone()), req);
        Ok(())
    }

    async fn start(&self, container: &str, exec_id: &str) -> Result<ProcessIo> {
        let (agent, timeout) = self.agent().await?;
        let stdin = if exec_id.is_empty() {
            agent.start_container(container).await?;
            true
        } else {
            let req = self
                .pod
                .lock()
                .await
                .as_mut()
                .and_then(|p| {
                    p.pending_execs
                        .remove(&(container.to_string(), exec_id.to_string()))
                })
                .ok_or_else(|| Error::NotFound(format!("exec {exec_id} of {container}")))?;
            let mut r = pb::ExecProcessRequest::new();
            r.container_id = container.into();
            r.exec_id = exec_id.into();
            r.oci_process_json =
                serde_json::to_vec(&req.process).map_err(|e| Error::Other(e.to_string()))?;
            r.stdin = req.stdin;
            agent
                .containers
                .exec_process(ctx(timeout), &r)
                .await
                .map_err(|e| agent_err("ExecProcess", e))?;
            req.stdin
        };
        let (id, ex) = (container.to_string(), exec_id.to_string());
        Ok(ProcessIo {
            stdin: stdin.then(|| stdin_writer(agent.clone(), id.clone(), ex.clone())),
            stdout: Some(output_reader(agent.clone(), id.clone(), ex.clone(), false)),
            stderr: Some(output_reader(agent, id, ex, true)),
        })
    }

    async fn wait(&self, container: &str, exec_id: &str) -> Result<ExitStatus> {
        let (agent, _) = self.agent().await?;
        let r = agent.wait_process(container, exec_id).await?;
        let code = if r.signal > 0 {
            128 + r.signal as u32
        } else {
            r.exit_status as u32
        };
        Ok(ExitStatus {
            code,
            oom_seq: r.oom_seq,
        })
    }

    async fn kill(&self, container: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let (agent, timeout) = self.agent().await?;
        let mut r = pb::SignalProcessRequest::new();
        r.container_id = container.into();
        r.exec_id = exec_id.into();
        r.signal = signal;
        r.all = all;
        agent
            .containers
            .signal_process(ctx(timeout), &r)
            .await
            .map_err(|e| agent_err("SignalProcess", e))?;
        Ok(())
    }

    async fn close_stdin(&self, container: &str, exec_id: &str) -> Result<()> {
        let (agent, _) = self.agent().await?;
        Ok(agent.close_stdin(container, exec_id).await?)
    }

    async fn resize_pty(
        &self,
        container: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<()> {
        let (agent, timeout) = self.agent().await?;
        let mut r = pb::TtyWinResizeRequest::new();
        r.container_id = container.into();
        r.exec_id = exec_id.into();
        r.rows = height;
        r.columns = width;
        agent
            .io
            .tty_win_resize(ctx(timeout), &r)
            .await
            .map_err(|e| agent_err("TtyWinResize", e))?;
        Ok(())
    }

    async fn pause(&self, container: &str) -> Result<()> {
        let (agent, timeout) = self.agent().await?;
        let mut r = pb::ContainerRequest::new();
        r.container_id = container.into();
        agent
            .containers
            .pause_container(ctx(timeout), &r)
            .await
            .map_err(|e| agent_err("PauseContainer", e))?;
        Ok(())
    }

    async fn resume(&self, container: &str) -> Result<()> {
        let (agent, timeout) = self.agent().await?;
        let mut r = pb::ContainerRequest::new();
        r.container_id = container.into();
        agent
            .containers
            .resume_container(ctx(timeout), &r)
            .await
            .map_err(|e| agent_err("ResumeContainer", e))?;
        Ok(())
    }

    async fn update(&self, container: &str, resources_json: &[u8]) -> Result<()> {
        let (agent, timeout) = self.agent().await?;
        let mut r = pb::UpdateContainerRequest::new();
        r.container_id = container.into();
        r.resources_json = resources_json.to_vec();
        agent
            .containers
            .update_container(ctx(timeout), &r)
            .await
            .map_err(|e| agent_err("UpdateContainer", e))?;
        Ok(())
    }

    async fn stats(&self, container: &str) -> Result<Any> {
        let (agent, timeout) = self.agent().await?;
        let mut r = pb::ContainerRequest::new();
        r.container_id = container.into();
        let s = agent
            .containers
            .stats_container(ctx(timeout), &r)
            .await
            .map_err(|e| agent_err("StatsContainer", e))?;
        let mut m = m2::Metrics::new();
        if let Some(c) = s.cpu.as_ref() {
            m.cpu = Some(m2::CPUStat {
                usage_usec: c.usage_usec,
                user_usec: c.user_usec,
                system_usec: c.system_usec,
                nr_periods: c.nr_periods,
                nr_throttled: c.nr_throttled,
                throttled_usec: c.throttled_usec,
                ..Default::default()
            })
            .into();
        }
        if let Some(mem) = s.memory.as_ref() {
            m.memory = Some(m2::MemoryStat {
                usage: mem.usage_bytes,
                usage_limit: mem.limit_bytes,
                max_usage: mem.max_usage_bytes,
                ..Default::default()
            })
            .into();
        }
        if let Some(p) = s.pids.as_ref() {
            m.pids = Some(m2::PidsStat {
                current: p.current,
                limit: p.limit,
                ..Default::default()
            })
            .into();
        }
        let mut any = Any::new();
        any.type_url = "io.containerd.cgroups.v2.Metrics".into();
        any.value = m
            .write_to_bytes()
            .map_err(|e| Error::Other(e.to_string()))?;
        Ok(any)
    }

    async fn oom_event(&self) -> Result<OomEvent> {
        let (agent, _) = self.agent().await?;
        // No deadline: the call returns when an OOM happens, or fails when the VM goes.
        let ev = agent
            .events
            .get_oom_event(
                husk_proto::ttrpc::context::Context::default(),
                &pb::Empty::new(),
            )
            .await
            .map_err(|e| agent_err("GetOOMEvent", e))?;
        Ok(OomEvent {
            container: ev.container_id,
            seq: ev.seq,
        })
    }

    async fn pids(&self, container: &str) -> Result<Vec<u32>> {
        let (agent, timeout) = self.agent().await?;
        let mut r = pb::ContainerRequest::new();
        r.container_id = container.into();
        let l = agent
            .containers
            .list_processes(ctx(timeout), &r)
            .await
            .map_err(|e| agent_err("ListProcesses", e))?;
        Ok(l.pids.into_iter().map(|p| p as u32).collect())
    }

    async fn delete_container(&self, container: &str) -> Result<()> {
        let agent = self.agent().await.map(|(a, _)| a);
        if let Ok(agent) = agent {
            if let Err(e) = agent.remove_container(container, 5000).await {
                tracing::warn!(%container, "remove in the guest: {e}");
            }
        }
        let mut pod = self.pod.lock().await;
        if let Some(p) = pod.as_mut() {
            if let Some(points) = p.mounts.remove(container) {
                unmount_all(&points);
                p.save_state();
            }
        }
        Ok(())
    }

    async fn stop_sandbox(&self) -> Result<()> {
        let Some(mut pod) = self.pod.lock().await.take() else {
            return Ok(());
        };
        // The guest lets go of the shared files first, then they are unmounted on the host.
        if pod.sandbox.vm().vmm_exit().is_none() {
            if let Err(e) = pod.sandbox.agent().destroy_sandbox(5000).await {
                tracing::warn!("destroy the sandbox in the guest: {e}");
            }
        }
        for (_, points) in pod.mounts.drain() {
            unmount_all(&points);
        }
        if let Err(e) = pod.sandbox.shutdown().await {
            tracing::warn!("sandbox shutdown: {e}");
        }
        remove_share(&pod.share);
        if let Err(e) = std::fs::remove_file(&pod.state_path) {
            tracing::warn!("remove {}: {e}", pod.state_path.display());
        }
        Ok(())
    }
}
