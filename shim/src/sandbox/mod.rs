//! The sandbox layer: one pod's microVM, its agent, and the containers and processes in it,
//! as `husk run` and the containerd shim both need them.
//!
//! - [`vm`]: the husk-vmm and virtiofsd processes, configured over the VMM's control API;
//! - [`process`]: how those processes are owned (pidfds, a long-lived spawner thread);
//! - [`network`]: network namespaces and taps in them, on dedicated threads;
//! - [`pod_network`]: the pod's CNI interfaces joined to the VM's NICs (tc mirred) and
//!   replayed to the agent;
//! - [`state`]: what the sandbox made, on disk, for a cleanup from a fresh process;
//! - [`host_cgroup`]: the pod's cgroup on the host, holding the owner and the VM's processes;
//! - this module: [`Sandbox`], which ties them to the agent ([`husk_agent_client::Agent`]).

mod error;
pub mod host_cgroup;
pub mod jail;
pub mod network;
pub mod pod_network;
pub mod process;
pub mod state;
pub mod vm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use husk_agent_client::{Agent, Rootfs};
use husk_proto::agent as pb;

pub use error::{Result, SandboxError};
use state::StateFile;
use vm::{Vm, VmSpec};

use crate::paths;

/// What a sandbox is made of.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// Names the sandbox's directory and state; see [`validate_id`].
    pub id: String,
    pub hostname: String,
    pub vm: VmSpec,
    /// From VMM start to the agent answering.
    pub boot_timeout: Duration,
    /// Make a network namespace of the sandbox's own (`<sandbox dir>/netns`), removed with
    /// it: for a pod nobody gave one (`ctr run` without CNI). See [`Sandbox::netns`].
    pub own_netns: bool,
    /// The OCI `linux.cgroupsPath` of the pod: when set, this process, husk-vmm and
    /// virtiofsd run in that host cgroup ([`host_cgroup`]).
    pub cgroups_path: Option<String>,
}

/// A container of the sandbox, as the host knows it.
#[derive(Clone, Debug)]
pub struct Container {
    pub rootfs: Rootfs,
    pub stdin: bool,
    pub started: bool,
}

/// A process of a container (`exec_id` "" is its init), as the host knows it.
#[derive(Clone, Debug, Default)]
pub struct Process {
    /// The agent's answer to WaitProcess, once it exited.
    pub exit: Option<pb::WaitProcessResponse>,
}

/// A pod microVM with its agent connected and its sandbox created in the guest.
///
/// [`Sandbox::shutdown`] takes it down in order; dropping it instead kills the VM's
/// processes and cleans up from the state, so no error path leaves anything behind.
pub struct Sandbox {
    id: String,
    host: HostResources,
    agent: Agent,
    containers: BTreeMap<String, Container>,
    processes: BTreeMap<(String, String), Process>,
}

/// What the sandbox holds on the host; dropped, it kills the VM's processes (reaping them)
/// and then cleans up everything its state records.
struct HostResources {
    run_root: PathBuf,
    id: String,
    state: Option<StateFile>,
    vm: Option<Vm>,
}

impl HostResources {
    fn vm(&self) -> &Vm {
        self.vm
            .as_ref()
            .expect("the VM lives as long as the sandbox")
    }
}

impl Drop for HostResources {
    fn drop(&mut self) {
        drop(self.vm.take());
        if self.state.take().is_some() {
            if let Err(e) = state::cleanup(&self.run_root, &self.id) {
                tracing::warn!("{e}");
            }
        }
    }
}

impl Sandbox {
    /// Boots the VM, waits for its agent and creates the sandbox in the guest. Sandboxes
    /// whose owner died are cleaned up first.
    pub async fn create(cfg: SandboxConfig) -> Result<Sandbox> {
        Self::create_in(&paths::run_root(), cfg).await
    }

    /// [`Sandbox::create`] under another run root.
    pub async fn create_in(run_root: &Path, cfg: SandboxConfig) -> Result<Sandbox> {
        validate_id(&cfg.id)?;
        let started = Instant::now();
        let root = run_root.to_path_buf();
        let spec = cfg.vm.clone();
        let id = cfg.id.clone();
        let own_netns = cfg.own_netns;
        let cgroups_path = cfg.cgroups_path.clone().filter(|p| !p.is_empty());
        // Blocking work (process start, socket waits, the blocking API client) on a blocking
        // thread; the processes' lifetime is not tied to it (see `process`).
        let (state, vm) = tokio::task::spawn_blocking(move || -> Result<(StateFile, Vm)> {
            state::sweep_orphans(&root);
            let mut state = StateFile::create(&root, &id)?;
            let netns = if own_netns {
                make_netns(&mut state)
            } else {
                Ok(())
            };
            let launched = netns
                .and_then(|()| match &cgroups_path {
                    // The VMM and virtiofsd are born in the cgroup: we enter it first. A host
                    // that cannot run VMs says so before anything about its cgroups.
                    Some(p) => husk_vmm_api::check::check_host()
                        .map_err(|e| SandboxError::NoKvm(e.to_string()))
                        .and_then(|()| {
                            host_cgroup::enter_pod_cgroup(p, |rec| {
                                state.update(|s| s.cgroup = Some(rec.clone()))
                            })
                        })
                        .map(drop),
                    None => Ok(()),
                })
                .and_then(|()| Vm::launch(&spec, &mut state));
            match launched {
                Ok(vm) => Ok((state, vm)),
                Err(e) => {
                    if let Err(c) = state::cleanup(&root, &id) {
                        tracing::warn!("{c}");
                    }
                    Err(e)
                }
            }
        })
        .await
        .map_err(|e| SandboxError::Invalid(format!("the VM launch task failed: {e}")))??;
        // From here on, dropping `host` cleans up.
        let host = HostResources {
            run_root: run_root.to_path_buf(),
            id: cfg.id.clone(),
            state: Some(state),
            vm: Some(vm),
        };
        let uds = host.vm().vsock_uds().to_path_buf();
        let deadline = started + cfg.boot_timeout;
        let connect = Agent::connect(&uds, husk_proto::AGENT_VSOCK_PORT, deadline, || {
            None::<SandboxError>
        });
        let agent = tokio::select! {
            agent = connect => agent?,
            gone = host.vm().vmm_exited() => return Err(gone),
        };
        let sandbox = Sandbox {
            id: cfg.id.clone(),
            host,
            agent,
            containers: BTreeMap::new(),
            processes: BTreeMap::new(),
        };
        tracing::debug!(ms = started.elapsed().as_millis() as u64, "agent answered");

        let mut req = pb::CreateSandboxRequest::new();
        req.sandbox_id = cfg.id.clone();
        req.hostname = cfg.hostname.clone();
        req.guest_time_unix_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        for share in &cfg.vm.shares {
            let mut s = pb::Share::new();
            s.tag = share.tag.clone();
            s.readonly = share.readonly;
            req.shares.push(s);
        }
        sandbox.agent.create_sandbox(&req).await?;
        Ok(sandbox)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The agent's clients, for calls this layer does not wrap (streams, network).
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    pub fn vm(&self) -> &Vm {
        self.host.vm()
    }

    /// The network namespace the sandbox made ([`SandboxConfig::own_netns`]).
    pub fn netns(&self) -> Option<&Path> {
        let state = self.host.state.as_ref()?.state();
        state
            .netns
            .as_ref()
            .filter(|n| n.owned)
            .map(|n| n.path.as_path())
    }

    /// The sandbox's directory (state, sockets, logs).
    pub fn dir(&self) -> &Path {
        self.host
            .state
            .as_ref()
            .expect("state lives as long as the sandbox")
            .dir()
    }

    pub fn containers(&self) -> &BTreeMap<String, Container> {
        &self.containers
    }

    pub fn processes(&self) -> &BTreeMap<(String, String), Process> {
        &self.processes
    }

    /// Resolves with an error saying how when the VMM exits.
    pub async fn vmm_exited(&self) -> SandboxError {
        self.vm().vmm_exited().await
    }

    /// Creates container `id` (spec as OCI JSON) in the guest.
    pub async fn create_container(
        &mut self,
        id: &str,
        spec: &serde_json::Value,
        rootfs: Rootfs,
        stdin: bool,
    ) -> Result<()> {
        self.agent
            .create_container(id, spec, &rootfs, stdin)
            .await?;
        self.containers.insert(
            id.to_string(),
            Container {
                rootfs,
                stdin,
                started: false,
            },
        );
        self.processes
            .insert((id.to_string(), String::new()), Process::default());
        Ok(())
    }

    pub async fn start_container(&mut self, id: &str) -> Result<()> {
        let c = self
            .containers
            .get_mut(id)
            .ok_or_else(|| SandboxError::NotFound {
                what: "container",
                id: id.into(),
            })?;
        self.agent.start_container(id).await?;
        c.started = true;
        Ok(())
    }

    /// Waits for a process to exit (however long) and records its exit.
    pub async fn wait_process(
        &mut self,
        id: &str,
        exec_id: &str,
    ) -> Result<pb::WaitProcessResponse> {
        let key = (id.to_string(), exec_id.to_string());
        if !self.processes.contains_key(&key) {
            return Err(SandboxError::NotFound {
                what: "process",
                id: format!("{id}/{exec_id}"),
            });
        }
        let exit = self.agent.wait_process(id, exec_id).await?;
        if let Some(p) = self.processes.get_mut(&key) {
            p.exit = Some(exit.clone());
        }
        Ok(exit)
    }

    pub async fn remove_container(&mut self, id: &str, timeout_ms: u32) -> Result<()> {
        self.agent.remove_container(id, timeout_ms).await?;
        self.containers.remove(id);
        self.processes.retain(|(c, _), _| c != id);
        Ok(())
    }

    /// Destroys the sandbox in the guest, stops the VM and removes everything the state
    /// records.
    pub async fn shutdown(mut self) -> Result<()> {
        if self.vm().vmm_exit().is_none() {
            if let Err(e) = self.agent.destroy_sandbox(5000).await {
                tracing::warn!("{e}");
            }
        }
        let vm = self.host.vm.take();
        let root = self.host.run_root.clone();
        let id = self.id.clone();
        self.host.state = None;
        tokio::task::spawn_blocking(move || {
            if let Some(vm) = vm {
                vm.shutdown();
            }
            state::cleanup(&root, &id)
        })
        .await
        .map_err(|e| SandboxError::Invalid(format!("the VM shutdown task failed: {e}")))?
    }

    /// Cleans up sandbox `id` from its state on disk alone: for a process that never held
    /// it (the shim's `delete`), or after its owner died.
    pub fn cleanup_from_state(id: &str) -> Result<()> {
        validate_id(id)?;
        state::cleanup(&paths::run_root(), id)
    }
}

/// Makes the sandbox's own network namespace, recorded first: a cleanup removes it even if
/// making it fails half-way.
fn make_netns(state: &mut StateFile) -> Result<()> {
    let path = state.dir().join("netns");
    state.update(|s| {
        s.netns = Some(state::NetnsRecord {
            path: path.clone(),
            owned: true,
        })
    })?;
    network::create_netns(&path)
}

/// Sandbox ids and share tags become file names: a safe alphabet and a bounded length (the
/// sockets under the sandbox directory must fit a Unix socket address).
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 40
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(SandboxError::Invalid(format!(
            "{id:?} is not a valid id: use 1-40 letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_file_name_safe() {
        for ok in ["pod-1", "a", "x_y.z", &"a".repeat(40)] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "..", ".hidden", "a/b", "a b", &"a".repeat(41), "ü"] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
    }
}
