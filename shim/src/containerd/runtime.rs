//! `PodRuntime`: the narrow boundary between the containerd-facing task service and the
//! sandbox layer below it (the pod's VM and its agent). The task service owns containerd's
//! view (task ids, states, stdio FIFOs, exit statuses, events); a `PodRuntime` owns the pod
//! (VMM, virtiofsd, rootfs shares, network, the agent connection) and speaks only in the
//! shim's own types: no ttrpc or containerd protobufs cross this line, except the Stats
//! `Any`, which is containerd's format by definition.
//!
//! One `PodRuntime` serves one pod sandbox. `create_sandbox` comes first (the sandbox
//! container's Create boots the VM); every container, the pause container included, is then
//! created with `create_container`.

use std::path::PathBuf;

use async_trait::async_trait;
use containerd_shim::protos::protobuf::well_known_types::any::Any;

use super::config::Config;
use super::error::Result;
use super::stdio::ProcessIo;

/// A containerd rootfs mount (`containerd.types.Mount`), in our own type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RootfsMount {
    pub kind: String,
    pub source: String,
    pub target: String,
    pub options: Vec<String>,
}

/// The sandbox container's Create: what the VM is booted for.
#[derive(Clone, Debug)]
pub struct SandboxRequest {
    /// The sandbox id (the sandbox container's id).
    pub id: String,
    /// containerd's namespace (`k8s.io` under CRI).
    pub namespace: String,
    /// The sandbox container's bundle (`config.json`, `rootfs/`).
    pub bundle: PathBuf,
    /// Its OCI spec (`config.json`), parsed: netns path, hostname, resolv.conf mount,
    /// `io.kubernetes.cri.sandbox-*` annotations for sizing.
    pub spec: serde_json::Value,
    pub config: Config,
}

/// A container to create in the pod (the pause container or an application container).
#[derive(Clone, Debug)]
pub struct ContainerRequest {
    pub id: String,
    pub bundle: PathBuf,
    /// The OCI spec from the bundle.
    pub spec: serde_json::Value,
    /// Mounts that make up the rootfs (to mount on `<bundle>/rootfs` and share); empty when
    /// containerd already mounted it there.
    pub rootfs: Vec<RootfsMount>,
    /// Whether the process gets stdin (containerd gave a stdin FIFO).
    pub stdin: bool,
    pub terminal: bool,
}

/// An exec process: the OCI `Process` as containerd sent it (JSON).
#[derive(Clone, Debug)]
pub struct ExecRequest {
    pub container: String,
    pub exec_id: String,
    pub process: serde_json::Value,
    pub stdin: bool,
    pub terminal: bool,
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitStatus {
    /// The exit code, or 128 + signal; 255 when the VM died under it.
    pub code: u32,
    /// The sequence number of the last OOM event the guest had queued when it reported the
    /// exit (0: none): those are published before the exit ([`super::oom_order`]).
    pub oom_seq: u64,
}

/// An OOM kill in the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OomEvent {
    /// The container a process of which was OOM-killed.
    pub container: String,
    /// The guest's number for the event, counting from 1.
    pub seq: u64,
}

/// The sandbox layer as the task service uses it. `exec_id` "" names a container's init
/// process. Implementations answer [`super::error::Error::NotFound`] for unknown ids.
#[async_trait]
pub trait PodRuntime: Send + Sync + 'static {
    /// Boots the pod's VM for the sandbox; returns the pid reported to containerd for every
    /// task of the pod (the VMM's: its `/proc/<pid>/ns/*` are the pod's namespaces).
    async fn create_sandbox(&self, req: SandboxRequest) -> Result<u32>;
    /// Creates a container in the VM; its init process waits for `start`.
    async fn create_container(&self, req: ContainerRequest) -> Result<()>;
    /// Registers an exec process of a running container; it runs at `start`.
    async fn exec(&self, req: ExecRequest) -> Result<()>;
    /// Starts a container's init or an exec process; returns its streams on the VM side
    /// (output the agent buffered before this call is not lost).
    async fn start(&self, container: &str, exec_id: &str) -> Result<ProcessIo>;
    /// Waits for a started process to exit, however long.
    async fn wait(&self, container: &str, exec_id: &str) -> Result<ExitStatus>;
    /// Signals a process, or with `all` every process of the container.
    async fn kill(&self, container: &str, exec_id: &str, signal: u32, all: bool) -> Result<()>;
    /// Closes a process's stdin (CloseIO).
    async fn close_stdin(&self, container: &str, exec_id: &str) -> Result<()>;
    async fn resize_pty(
        &self,
        container: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<()>;
    /// Freezes / thaws a container (guest cgroup freezer).
    async fn pause(&self, container: &str) -> Result<()>;
    async fn resume(&self, container: &str) -> Result<()>;
    /// Applies OCI `LinuxResources` (JSON, as containerd sends them) to a container.
    async fn update(&self, container: &str, resources_json: &[u8]) -> Result<()>;
    /// The container's cgroup v2 statistics as containerd's `io.containerd.cgroups.v2.Metrics`.
    async fn stats(&self, container: &str) -> Result<Any>;
    /// Long poll: the next OOM kill in the guest. Errors once the pod's VM is gone (the OOM
    /// watcher then ends).
    async fn oom_event(&self) -> Result<OomEvent>;
    /// Pids of the container's processes (in the guest).
    async fn pids(&self, container: &str) -> Result<Vec<u32>>;
    /// Removes a container from the VM and unmounts its rootfs on the host; done before
    /// Delete answers (`ctr run --rm` removes the snapshot next).
    async fn delete_container(&self, container: &str) -> Result<()>;
    /// Tears the pod's VM down (after its last container is deleted, or on Shutdown).
    async fn stop_sandbox(&self) -> Result<()>;
}
