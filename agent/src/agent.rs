//! The agent's operations, independent of the transport: the ttrpc services call these.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use oci_spec::runtime::{LinuxNamespaceType, LinuxResources};

use crate::config::{Config, Mode};
use crate::container::Container;
use crate::error::{AgentError, Result};
use crate::helper::HelperRequest;
use crate::ids::{self, validate_exec_id, validate_id};
use crate::net::Net;
use crate::oom::OomEvents;
use crate::process::{self, PendingIo, Process};
use crate::reaper::{ExitInfo, Reaper};
use crate::runtime::{ChildStdio, Runtime, RuntimeError};
use crate::sandbox::{self, Sandbox};
use crate::security;
use crate::{cgroups, spec};
use husk_proto::agent as pb;

/// Default wait for processes to die on remove/destroy.
const DEFAULT_KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often container cgroups are checked for OOM kills.
const OOM_POLL: Duration = Duration::from_millis(200);
/// How long a terminal container gets to hand over its pty master (libcontainer does it
/// during creation, long before the process runs).
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The agent: one sandbox and its containers.
pub struct Agent {
    cfg: Config,
    reaper: Arc<Reaper>,
    runtime: Runtime,
    sandbox: tokio::sync::Mutex<Option<Sandbox>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Ids being created, so two CreateContainer calls cannot race for one id.
    creating: Mutex<HashSet<String>>,
    oom: OomEvents,
    /// Netlink connection to the sandbox's network namespace, opened on first use.
    net: tokio::sync::Mutex<Option<Arc<Net>>>,
}

/// Removes a reserved id from `creating` when creation ends, however it ends.
struct Reservation<'a> {
    agent: &'a Agent,
    id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.agent
            .creating
            .lock()
            .expect("creating lock")
            .remove(&self.id);
    }
}

fn rt_err(what: &str, e: RuntimeError) -> AgentError {
    AgentError::Internal(format!("{what}: {e}"))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::internal("blocking task", e))?
}

impl Agent {
    /// Creates the agent; needs a tokio runtime (starts the reaper).
    pub fn new(cfg: Config) -> Result<Arc<Self>> {
        for d in [
            cfg.containers_dir(),
            cfg.bundles_dir(),
            cfg.tmp_dir(),
            cfg.share_root.clone(),
        ] {
            std::fs::create_dir_all(&d)
                .map_err(|e| AgentError::internal(format!("create {}", d.display()), e))?;
        }
        let reaper = Reaper::start().map_err(|e| AgentError::internal("start reaper", e))?;
        let runtime = Runtime::new(cfg.exe.clone(), cfg.tmp_dir(), reaper.clone());
        Ok(Arc::new(Self {
            cfg,
            reaper,
            runtime,
            sandbox: tokio::sync::Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
            creating: Mutex::new(HashSet::new()),
            oom: OomEvents::new(),
            net: tokio::sync::Mutex::new(None),
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    // ---- sandbox ---------------------------------------------------------------------

    pub async fn create_sandbox(&self, req: &pb::CreateSandboxRequest) -> Result<()> {
        let mut guard = self.sandbox.lock().await;
        if let Some(sb) = guard.as_ref() {
            return Err(AgentError::AlreadyExists(format!(
                "sandbox {} already exists: call DestroySandbox first",
                sb.id
            )));
        }
        let sb = sandbox::create(&self.cfg, &self.runtime, req).await?;
        tracing::info!(sandbox = %sb.id, "sandbox created");
        *guard = Some(sb);
        Ok(())
    }

    pub async fn destroy_sandbox(&self, timeout_ms: u32) -> Result<()> {
        let ids: Vec<String> = self
            .containers
            .lock()
            .expect("containers lock")
            .keys()
            .cloned()
            .collect();
        for id in ids {
            if let Err(e) = self.remove_container(&id, timeout_ms).await {
                tracing::warn!(container = %id, "remove on destroy: {e}");
            }
        }
        self.net.lock().await.take();
        if let Some(sb) = self.sandbox.lock().await.take() {
            sandbox::destroy(&sb);
            tracing::info!(sandbox = %sb.id, "sandbox destroyed");
        }
        Ok(())
    }

    async fn sandbox_snapshot(&self) -> Result<Sandbox> {
        self.sandbox.lock().await.clone().ok_or_else(|| {
            AgentError::FailedPrecondition(
                "no sandbox: call CreateSandbox before creating containers".into(),
            )
        })
    }

    // ---- containers ------------------------------------------------------------------

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        validate_id("container", id)?;
        self.containers
            .lock()
            .expect("containers lock")
            .get(id)
            .cloned()
            .ok_or_else(|| {
                AgentError::NotFound(format!("no container with id {id:?} in this sandbox"))
            })
    }

    fn process(&self, cid: &str, exec_id: &str) -> Result<Arc<Process>> {
        validate_exec_id(exec_id)?;
        self.container(cid)?.process(exec_id)
    }

    /// The init pid of the sandbox's first container, whose namespaces the others join, if
    /// it still runs. When it is gone (no pause container, e.g. `husk run`), the next container
    /// takes its place instead of failing on namespaces that no longer exist.
    fn live_first(&self, sb: &Sandbox) -> Option<i32> {
        let (id, pid) = sb.first.as_ref()?;
        let c = self
            .containers
            .lock()
            .expect("containers lock")
            .get(id)
            .cloned()?;
        if c.init.exited().is_some() {
            tracing::warn!(container = %id, "the sandbox's first container exited; the next one holds the pod's namespaces");
            return None;
        }
        Some(*pid)
    }

    fn reserve(&self, id: &str) -> Result<Reservation<'_>> {
        let exists = self
            .containers
            .lock()
            .expect("containers lock")
            .contains_key(id);
        if exists
            || !self
                .creating
                .lock()
                .expect("creating lock")
                .insert(id.to_string())
        {
            return Err(AgentError::AlreadyExists(format!(
                "container {id:?} already exists: remove it first or pick another id"
            )));
        }
        Ok(Reservation {
            agent: self,
            id: id.to_string(),
        })
    }

    pub async fn create_container(
        self: &Arc<Self>,
        req: &pb::CreateContainerRequest,
    ) -> Result<()> {
        let cid = req.container_id.as_str();
        validate_id("container", cid)?;
        validate_exec_id(&req.exec_id)?;
        let sb = self.sandbox_snapshot().await?;
        let _reservation = self.reserve(cid)?;

        let mut spec = spec::parse_spec(&req.oci_spec_json)?;
        let rootfs_src = req.rootfs.as_ref().ok_or_else(|| {
            AgentError::InvalidArgument(
                "rootfs is missing: give the share tag and path of the container's root filesystem"
                    .into(),
            )
        })?;
        validate_id("share tag", &rootfs_src.share_tag)?;
        let rootfs = ids::resolve_within(
            &self.cfg.share_root.join(&rootfs_src.share_tag),
            &rootfs_src.path,
            "rootfs path",
        )?;

        let view = spec::SandboxView {
            sandbox_id: &sb.id,
            hostname: &sb.hostname,
            resolv_conf: sb.resolv_conf.as_deref(),
            netns: sb.netns.as_deref(),
            first_init_pid: self.live_first(&sb),
            shared_pid: sb.shared_pid,
            share_root: &self.cfg.share_root,
        };
        spec::prepare(&mut spec, cid, &rootfs, &req.mounts, &view)?;
        security::prepare(&mut spec)?;
        spec::apply_sysctls(&spec::take_net_sysctls(&mut spec, &view))?;
        let own_pid_ns = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|ns| {
                ns.iter()
                    .any(|n| n.typ() == LinuxNamespaceType::Pid && n.path().is_none())
            });
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);

        let bundle = self.cfg.bundles_dir().join(cid);
        let _ = std::fs::remove_dir_all(&bundle);
        std::fs::create_dir_all(&bundle)
            .map_err(|e| AgentError::internal("create bundle dir", e))?;
        spec.save(bundle.join("config.json"))
            .map_err(|e| AgentError::internal("write config.json", e))?;

        let req_fn = |console: Option<&Path>| HelperRequest::Create {
            id: cid.to_string(),
            root: self.cfg.containers_dir(),
            bundle: bundle.clone(),
            console_socket: console.map(Path::to_path_buf),
            no_pivot: self.cfg.no_pivot,
        };
        let started = self
            .spawn_via_helper(terminal, req.stdin, &format!("console-{cid}"), req_fn)
            .await;
        let (pid, io) = match started {
            Ok(v) => v,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&bundle);
                let _ = std::fs::remove_dir_all(self.cfg.containers_dir().join(cid));
                // libcontainer may have made the cgroup before failing.
                let cg = spec::cgroup_path(&sb.id, cid);
                let _ = blocking(move || Ok(cgroups::remove(&cg)?)).await;
                return Err(match e {
                    AgentError::Internal(m) => {
                        AgentError::Internal(format!("create container {cid}: {m}"))
                    }
                    other => other,
                });
            }
        };
        let init = Process::new(req.exec_id.clone(), pid, io, &self.reaper)?;
        let cgroup_path = spec::cgroup_path(&sb.id, cid);
        let c = Arc::new(Container::new(
            cid.to_string(),
            req.exec_id.clone(),
            bundle,
            cgroup_path,
            own_pid_ns,
            init,
        ));
        self.containers
            .lock()
            .expect("containers lock")
            .insert(cid.to_string(), c.clone());
        if let Some(s) = self.sandbox.lock().await.as_mut() {
            if self.live_first(s).is_none() {
                s.first = Some((cid.to_string(), pid));
            }
        }
        self.watch_oom(&c);
        tracing::info!(container = cid, pid, "container created");
        Ok(())
    }

    /// Runs a helper that creates a process, wiring its stdio (pipes, or a pty received on
    /// a console socket). Returns the pid and our ends of its stdio.
    async fn spawn_via_helper(
        &self,
        terminal: bool,
        stdin: bool,
        console_name: &str,
        make_req: impl FnOnce(Option<&Path>) -> HelperRequest,
    ) -> Result<(i32, PendingIo)> {
        if terminal {
            // Named by a sequence number, not by `console_name`: a CRI exec's 64-character
            // container id and its exec id make a path longer than a Unix socket's 108
            // bytes (SUN_LEN), and the tty exec failed.
            static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let sock_path = self.cfg.tmp_dir().join(format!("console-{n}.sock"));
            tracing::debug!(process = console_name, path = %sock_path.display(), "console socket");
            let console = Arc::new(crate::tty::ConsoleSocket::bind(&sock_path)?);
            let req = make_req(Some(console.path()));
            // Accept while the helper runs: the container connects during creation.
            let c2 = console.clone();
            let master = tokio::task::spawn_blocking(move || c2.receive_master(CONSOLE_TIMEOUT));
            let pid = match self.runtime.run(&req, None).await {
                Ok(pid) => pid,
                Err(e) => {
                    // Unblock the accept by connecting to ourselves, then report the failure.
                    let _ = std::os::unix::net::UnixStream::connect(console.path());
                    let _ = master.await;
                    return Err(rt_err("runtime", e));
                }
            };
            let master = master
                .await
                .map_err(|e| AgentError::internal("console task", e))??;
            let pid = pid.ok_or_else(|| AgentError::Internal("helper reported no pid".into()))?;
            Ok((pid, process::pty_io(master)?))
        } else {
            let (child, ours): (ChildStdio, PendingIo) = process::pipes(stdin)?;
            let req = make_req(None);
            let pid = self
                .runtime
                .run(&req, Some(child))
                .await
                .map_err(|e| rt_err("runtime", e))?;
            let pid = pid.ok_or_else(|| AgentError::Internal("helper reported no pid".into()))?;
            Ok((pid, ours))
        }
    }

    pub async fn start_container(&self, cid: &str) -> Result<()> {
        let c = self.container(cid)?;
        if !c.mark_started() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {cid} was already started"
            )));
        }
        if let Some(e) = c.init.exited() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {cid}'s init process already exited (status {})",
                e.status
            )));
        }
        let dir = self.cfg.containers_dir().join(cid);
        blocking(move || {
            let mut lc = libcontainer::container::Container::load(dir)
                .map_err(|e| AgentError::internal("load container state", e))?;
            lc.start()
                .map_err(|e| AgentError::internal("start container", e))
        })
        .await?;
        tracing::info!(container = cid, "container started");
        Ok(())
    }

    pub async fn exec_process(&self, req: &pb::ExecProcessRequest) -> Result<()> {
        let c = self.container(&req.container_id)?;
        if req.exec_id.is_empty() {
            return Err(AgentError::InvalidArgument(
                "exec_id is empty: name the new process".into(),
            ));
        }
        validate_id("exec", &req.exec_id)?;
        if c.has_exec(&req.exec_id) {
            return Err(AgentError::AlreadyExists(format!(
                "container {} already has a process with exec id {:?}",
                c.id, req.exec_id
            )));
        }
        if !c.is_started() || c.init.exited().is_some() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {} is not running: exec needs a started, live container",
                c.id
            )));
        }
        let mut proc_spec = spec::parse_process(&req.oci_process_json)?;
        security::normalise_process(&mut proc_spec);
        if let Ok(cspec) = oci_spec::runtime::Spec::load(c.bundle.join("config.json")) {
            if let Some(root) = cspec.root().as_ref() {
                spec::check_process_executable(&proc_spec, &cspec, root.path())?;
            }
        }
        let terminal = proc_spec.terminal().unwrap_or(false);
        let pjson = c.bundle.join(format!("exec-{}.json", req.exec_id));
        let data = serde_json::to_vec(&proc_spec)
            .map_err(|e| AgentError::internal("encode process", e))?;
        std::fs::write(&pjson, data).map_err(|e| AgentError::internal("write process.json", e))?;
        let res = self
            .spawn_via_helper(
                terminal,
                req.stdin,
                &format!("console-{}-{}", c.id, req.exec_id),
                |console| HelperRequest::Exec {
                    container_id: c.id.clone(),
                    root: self.cfg.containers_dir(),
                    process_json: pjson.clone(),
                    console_socket: console.map(Path::to_path_buf),
                },
            )
            .await;
        let _ = std::fs::remove_file(&pjson);
        let (pid, io) = res.map_err(|e| match e {
            AgentError::Internal(m) => {
                AgentError::Internal(format!("exec in container {}: {m}", c.id))
            }
            other => other,
        })?;
        c.add_exec(Process::new(req.exec_id.clone(), pid, io, &self.reaper)?);
        tracing::info!(container = %c.id, exec = %req.exec_id, pid, "process started");
        Ok(())
    }

    pub async fn signal_process(&self, req: &pb::SignalProcessRequest) -> Result<()> {
        let sig = i32::try_from(req.signal)
            .map_err(|_| AgentError::InvalidArgument(format!("bad signal {}", req.signal)))?;
        nix::sys::signal::Signal::try_from(sig)
            .map_err(|_| AgentError::InvalidArgument(format!("unknown signal {sig}")))?;
        let c = self.container(&req.container_id)?;
        if req.all {
            return self.signal_all(&c, sig).await;
        }
        c.process(&req.exec_id)?.signal(sig)
    }

    async fn signal_all(&self, c: &Container, sig: i32) -> Result<()> {
        let path = c.cgroup_path.clone();
        let pids = blocking(move || Ok(cgroups::pids(&path)?)).await?;
        let signal = nix::sys::signal::Signal::try_from(sig)
            .map_err(|_| AgentError::InvalidArgument(format!("unknown signal {sig}")))?;
        for p in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), signal);
        }
        Ok(())
    }

    /// Waits for a process to exit; also returns the OOM event sequence number after its
    /// container's cgroup was checked for OOM kills (see [`crate::oom`]).
    pub async fn wait_process(&self, cid: &str, exec_id: &str) -> Result<(ExitInfo, u64)> {
        let p = self.process(cid, exec_id)?;
        let exit = p.wait().await?;
        if let Ok(c) = self.container(cid) {
            self.oom.check(cid, &c.cgroup_path);
        }
        Ok((exit, self.oom.seq()))
    }

    pub async fn remove_container(&self, cid: &str, timeout_ms: u32) -> Result<()> {
        let c = self.container(cid)?;
        let timeout = if timeout_ms == 0 {
            DEFAULT_KILL_TIMEOUT
        } else {
            Duration::from_millis(timeout_ms.into())
        };
        // Kill what is left: the whole cgroup, and our processes by pid for good measure.
        let _ = self.signal_all(&c, libc::SIGKILL).await;
        for p in c.processes() {
            let _ = p.signal(libc::SIGKILL);
        }
        let waits = c.processes();
        let all = async {
            for p in &waits {
                let _ = p.wait().await;
            }
        };
        if tokio::time::timeout(timeout, all).await.is_err() {
            return Err(AgentError::DeadlineExceeded(format!(
                "container {cid}'s processes did not exit within {timeout:?} of SIGKILL; try again"
            )));
        }
        let dir = self.cfg.containers_dir().join(cid);
        blocking(move || {
            if dir.exists() {
                let mut lc = libcontainer::container::Container::load(dir.clone())
                    .map_err(|e| AgentError::internal("load container state", e))?;
                lc.delete(true)
                    .map_err(|e| AgentError::internal("delete container", e))?;
            }
            Ok(())
        })
        .await?;
        let _ = std::fs::remove_dir_all(&c.bundle);
        self.containers.lock().expect("containers lock").remove(cid);
        self.oom.forget(cid);
        if let Some(s) = self.sandbox.lock().await.as_mut() {
            if s.first.as_ref().is_some_and(|f| f.0 == cid) {
                s.first = None;
            }
        }
        tracing::info!(container = cid, "container removed");
        Ok(())
    }

    pub async fn update_container(&self, cid: &str, resources_json: &[u8]) -> Result<()> {
        let c = self.container(cid)?;
        let res: LinuxResources = serde_json::from_slice(resources_json).map_err(|e| {
            AgentError::InvalidArgument(format!(
                "resources_json is not valid OCI LinuxResources: {e}"
            ))
        })?;
        let path = c.cgroup_path.clone();
        blocking(move || Ok(cgroups::update(&path, &res)?)).await
    }

    pub async fn stats_container(&self, cid: &str) -> Result<pb::StatsContainerResponse> {
        let c = self.container(cid)?;
        let path = c.cgroup_path.clone();
        blocking(move || Ok(cgroups::stats(&path)?)).await
    }

    pub async fn pause_container(&self, cid: &str, pause: bool) -> Result<()> {
        let c = self.container(cid)?;
        let dir = self.cfg.containers_dir().join(&c.id);
        blocking(move || {
            let mut lc = libcontainer::container::Container::load(dir)
                .map_err(|e| AgentError::internal("load container state", e))?;
            let r = if pause { lc.pause() } else { lc.resume() };
            r.map_err(|e| {
                AgentError::FailedPrecondition(format!(
                    "{}: {e}",
                    if pause { "pause" } else { "resume" }
                ))
            })
        })
        .await
    }

    pub async fn list_processes(&self, cid: &str) -> Result<Vec<i32>> {
        let c = self.container(cid)?;
        let path = c.cgroup_path.clone();
        blocking(move || Ok(cgroups::pids(&path)?)).await
    }

    // ---- I/O -------------------------------------------------------------------------

    pub async fn write_stdin(&self, cid: &str, exec_id: &str, data: &[u8]) -> Result<()> {
        self.process(cid, exec_id)?.write_stdin(data).await
    }

    pub async fn close_stdin(&self, cid: &str, exec_id: &str) -> Result<()> {
        self.process(cid, exec_id)?.close_stdin().await
    }

    pub async fn read_output(
        &self,
        cid: &str,
        exec_id: &str,
        stderr: bool,
        max: u32,
    ) -> Result<(Vec<u8>, bool)> {
        let p = self.process(cid, exec_id)?;
        let max = match max {
            0 => 64 * 1024,
            n => (n as usize).min(1 << 20),
        };
        let buf = if stderr { &p.stderr } else { &p.stdout };
        Ok(buf.read(max).await)
    }

    pub fn resize_tty(&self, cid: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let rows = u16::try_from(rows)
            .map_err(|_| AgentError::InvalidArgument("rows out of range".into()))?;
        let cols = u16::try_from(cols)
            .map_err(|_| AgentError::InvalidArgument("columns out of range".into()))?;
        self.process(cid, exec_id)?.resize(rows, cols)
    }

    // ---- events ----------------------------------------------------------------------

    /// Polls the container's cgroup for OOM kills until the container is gone.
    fn watch_oom(self: &Arc<Self>, c: &Arc<Container>) {
        let weak_c: Weak<Container> = Arc::downgrade(c);
        let weak_a: Weak<Agent> = Arc::downgrade(self);
        self.oom.watch(&c.id, &c.cgroup_path);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(OOM_POLL).await;
                let (Some(c), Some(a)) = (weak_c.upgrade(), weak_a.upgrade()) else {
                    break;
                };
                if !a
                    .containers
                    .lock()
                    .expect("containers lock")
                    .contains_key(&c.id)
                {
                    break;
                }
                a.oom.check(&c.id, &c.cgroup_path);
            }
        });
    }

    /// Waits for the next OOM event: its sequence number and container.
    pub async fn next_oom_event(&self) -> (u64, String) {
        self.oom.next().await
    }

    // ---- network ---------------------------------------------------------------------

    /// The netlink connection: the guest's own namespace, or the host-mode sandbox's.
    /// The pod's network namespace, for connections made into it: `None` in the guest
    /// (the agent's own is the pod's); the sandbox's namespace file in host mode.
    pub async fn pod_netns(&self) -> Result<Option<std::path::PathBuf>> {
        match self.cfg.mode {
            Mode::Guest => Ok(None),
            Mode::Host => Ok(Some(self.sandbox_snapshot().await?.netns.ok_or_else(
                || AgentError::FailedPrecondition("the sandbox has no network namespace".into()),
            )?)),
        }
    }

    pub async fn net(&self) -> Result<Arc<Net>> {
        let mut g = self.net.lock().await;
        if let Some(n) = g.as_ref() {
            return Ok(n.clone());
        }
        let netns = match self.cfg.mode {
            Mode::Guest => None,
            Mode::Host => Some(self.sandbox_snapshot().await?.netns.ok_or_else(|| {
                AgentError::FailedPrecondition("the sandbox has no network namespace".into())
            })?),
        };
        let n = Arc::new(Net::connect(netns.as_deref()).await?);
        *g = Some(n.clone());
        Ok(n)
    }
}
