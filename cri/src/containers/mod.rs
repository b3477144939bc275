//! App containers in a pod's VM, through the pod's shim, as containerd's CRI plugin drives
//! it: CreateContainer writes the bundle (config.json from [`container_spec`]), makes the
//! container's upper/work dirs and stdio FIFOs (their log writer already reading), runs the
//! shim's `start` (which answers with the pod's shim address) and has the shim Create the
//! task with the image's layers as an overlay rootfs mount; Start, then a waiter records
//! the exit. Stop signals SIGTERM, then SIGKILL after the timeout; Stop and Remove are
//! idempotent. Any failure of Create undoes what it made. Each container's record is kept
//! on disk ([`crate::records`]); a restarted huskd restores them (`restore.rs`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

mod attach;
mod exec;
mod exec_stream;
mod exit;
mod filter;
mod live;
mod restore;
mod security;
mod stats;

pub use attach::ContainerStdin;
pub use exec::ExecOutput;
pub use exec_stream::ProcessStreams;
pub use filter::Filter;
pub use live::Resources;
pub use stats::ContainerStats;

use crate::container_spec::{self, ContainerConfig, ImageConfig, PodView, SpecError};
use crate::fanout::Fanout;
use crate::image::pull::lookup_key;
use crate::image::{ImageError, Store};
use crate::logs::{self, LogFile};
use crate::pods::{Pod, PodState};
use crate::records::Records;
use crate::shim_client::{Shim, ShimError, ShimLauncher, TaskCreate};

/// How long a SIGKILLed container may take to be reported exited.
const KILL_GRACE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("pod sandbox {0:?} not found")]
    PodNotFound(String),
    #[error("pod sandbox {0:?} is not ready")]
    PodNotReady(String),
    #[error("container {0:?} not found")]
    NotFound(String),
    #[error("invalid container config: {0}")]
    InvalidConfig(String),
    #[error("invalid container config: {0}")]
    Spec(#[from] SpecError),
    #[error("image {0:?} not found: pull it first")]
    ImageNotFound(String),
    #[error("image store: {0}")]
    Image(#[from] ImageError),
    #[error("container name {name:?} (attempt {attempt}) is in use by {id} in this pod")]
    NameInUse {
        name: String,
        attempt: u32,
        id: String,
    },
    #[error("container {id} is {state:?}; {call} needs it {want}")]
    State {
        id: String,
        state: ContainerState,
        call: &'static str,
        want: &'static str,
    },
    #[error("container in the shim: {0}")]
    Shim(#[from] ShimError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("container {id} did not exit within {after:?} of SIGKILL")]
    StopTimeout { id: String, after: Duration },
    #[error("command timed out after {0:?} (killed in the guest)")]
    ExecTimeout(Duration),
    #[error("container {id} has no stdin to attach to: {why}")]
    StdinClosed { id: String, why: String },
}

pub(crate) fn io_err(
    context: impl std::fmt::Display,
) -> impl FnOnce(std::io::Error) -> ContainerError {
    let context = context.to_string();
    move |source| ContainerError::Io { context, source }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    Created,
    Running,
    Exited,
}

/// A container huskd runs (also its record on disk).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Container {
    pub id: String,
    pub pod_id: String,
    pub config: ContainerConfig,
    /// The image as CRI reports it: a tag (else the reference asked for) and its id.
    pub image_name: String,
    pub image_id: String,
    /// A repo digest when the image has one, else its id.
    pub image_ref: String,
    pub state: ContainerState,
    pub created_at_ns: i64,
    pub started_at_ns: i64,
    pub finished_at_ns: i64,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    /// Absolute; None when the pod has no log directory or the container no log path.
    pub log_path: Option<PathBuf>,
    /// The container's OCI process (ExecSync runs its command with the same env, cwd, user).
    pub process: serde_json::Value,
    pub(crate) bundle: PathBuf,
    rw_dir: PathBuf,
    pub(crate) shim_address: String,
    task_deleted: bool,
    /// The shim reported an OOM kill in the container (its reason at exit is `OOMKilled`).
    #[serde(default)]
    pub oom_killed: bool,
}

struct Slot {
    c: Container,
    log_writer: Option<JoinHandle<()>>,
    /// The open log file (ReopenContainerLog swaps it).
    log_file: Option<LogFile>,
    /// The container's output for attached clients (fed by the log writer).
    output: Arc<Fanout>,
    /// The write end of its stdin FIFO, for a container created with stdin.
    stdin: Option<Arc<ContainerStdin>>,
    exited: watch::Sender<bool>,
}

/// What Create made for the container's stdio, handed out as soon as it exists (for the
/// caller to undo on failure, or to keep).
#[derive(Default)]
struct MadeIo {
    log_writer: Option<JoinHandle<()>>,
    log_file: Option<LogFile>,
    output: Arc<Fanout>,
    stdin: Option<Arc<ContainerStdin>>,
}

type Table = Arc<Mutex<HashMap<String, Slot>>>;

pub struct Containers {
    store: Arc<Store>,
    bundles: PathBuf,
    rw_root: PathBuf,
    launcher: ShimLauncher,
    records: Records,
    cpu_samples: stats::CpuSamples,
    table: Table,
}

pub(crate) fn new_id() -> String {
    let mut b = [0u8; 32];
    // SAFETY: b is a valid, writable buffer of the given length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    assert_eq!(n, b.len() as isize, "getrandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

/// Unmounts `path` if something is mounted there (a shim that died before its Delete).
fn unmount_if_mounted(path: &Path) {
    let p = path.display().to_string();
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(p.as_str()));
    if mounted {
        if let Err(e) = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
            warn!(path = %p, error = %e, "unmount a container rootfs");
        }
    }
}

/// Removes a container's directories (its rootfs unmounted first, so the removal never
/// reaches into a mount).
fn remove_dirs(bundle: &Path, rw: &Path) {
    unmount_if_mounted(&bundle.join("rootfs"));
    for d in [bundle, rw] {
        if let Err(e) = std::fs::remove_dir_all(d) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(dir = %d.display(), error = %e, "remove a container directory");
            }
        }
    }
}

impl Containers {
    pub fn new(
        store: Arc<Store>,
        state_dir: &Path,
        data_dir: &Path,
        launcher: ShimLauncher,
    ) -> Containers {
        Containers {
            store,
            bundles: state_dir.join("bundles"),
            rw_root: data_dir.join("containers"),
            launcher,
            records: Records::new(state_dir.join("containers")),
            cpu_samples: Default::default(),
            table: Arc::default(),
        }
    }

    pub fn get(&self, id: &str) -> Option<Container> {
        self.table
            .lock()
            .expect("containers lock")
            .get(id)
            .map(|s| s.c.clone())
    }

    pub fn list(&self, f: &Filter) -> Vec<Container> {
        let t = self.table.lock().expect("containers lock");
        t.values()
            .map(|s| &s.c)
            .filter(|c| f.matches(c))
            .cloned()
            .collect()
    }

    /// Changes a container and its record.
    fn update(&self, id: &str, f: impl FnOnce(&mut Container)) {
        if let Some(s) = self.table.lock().expect("containers lock").get_mut(id) {
            f(&mut s.c);
            save(&self.records, &s.c);
        }
    }

    /// CreateContainer. On error nothing of the container is left.
    pub async fn create(&self, pod: &Pod, cfg: ContainerConfig) -> Result<String, ContainerError> {
        if pod.state != PodState::Ready {
            return Err(ContainerError::PodNotReady(pod.id.clone()));
        }
        if cfg.name.is_empty() {
            return Err(ContainerError::InvalidConfig(
                "metadata.name is empty".into(),
            ));
        }
        if cfg.image.is_empty() {
            return Err(ContainerError::InvalidConfig("image.image is empty".into()));
        }
        let rec = self
            .store
            .find(&lookup_key(&cfg.image))
            .or_else(|| self.store.find(&cfg.image))
            .ok_or_else(|| ContainerError::ImageNotFound(cfg.image.clone()))?;
        let blob = self
            .store
            .blob(&rec.id)?
            .ok_or_else(|| ContainerError::ImageNotFound(cfg.image.clone()))?;
        let img = ImageConfig::parse(&blob)?;
        let image_name = rec
            .repo_tags
            .first()
            .cloned()
            .unwrap_or_else(|| cfg.image.clone());
        let (resolv_conf, hostname_file) = (pod.resolv_conf(), pod.hostname_file());
        let view = PodView {
            id: &pod.id,
            name: &pod.spec.name,
            namespace: &pod.spec.namespace,
            uid: &pod.spec.uid,
            hostname: &pod.spec.hostname,
            netns: pod.netns_path(),
            etc_files: &[
                ("/etc/resolv.conf", resolv_conf.as_path()),
                ("/etc/hostname", hostname_file.as_path()),
            ],
        };
        let lowers = rec
            .layers
            .iter()
            .map(|d| self.store.layer_rootfs(d))
            .collect::<Result<Vec<_>, _>>()?;
        if lowers.is_empty() {
            return Err(ContainerError::InvalidConfig(format!(
                "image {} has no layers",
                rec.id
            )));
        }
        let resolved = security::resolve(&cfg, &img, &lowers, pod.spec.privileged)?;
        let mut spec = container_spec::container_spec(&cfg, &img, &image_name, &view, &resolved)?;
        if cfg.tty {
            with_tty(&mut spec["process"]);
        }
        if let Some(other) = self
            .list(&Filter {
                pod_id: pod.id.clone(),
                ..Default::default()
            })
            .into_iter()
            .find(|c| c.config.name == cfg.name && c.config.attempt == cfg.attempt)
        {
            return Err(ContainerError::NameInUse {
                name: cfg.name,
                attempt: cfg.attempt,
                id: other.id,
            });
        }
        let log_path = (!pod.spec.log_directory.is_empty() && !cfg.log_path.is_empty())
            .then(|| Path::new(&pod.spec.log_directory).join(&cfg.log_path));
        let id = new_id();
        let bundle = self.bundles.join(&id);
        let rw = self.rw_root.join(&id);
        let mut io = MadeIo::default();
        let made = self
            .make(
                &id,
                &bundle,
                &rw,
                (&spec, &cfg),
                &lowers,
                log_path.as_deref(),
                &mut io,
            )
            .await;
        let address = match made {
            Ok(a) => a,
            Err(e) => {
                warn!(container = %id, error = %e, "CreateContainer failed; undoing it");
                if let Some(w) = io.log_writer {
                    w.abort();
                }
                remove_dirs(&bundle, &rw);
                return Err(e);
            }
        };
        let c = Container {
            id: id.clone(),
            pod_id: pod.id.clone(),
            image_name,
            image_ref: rec.repo_digests.first().cloned().unwrap_or(rec.id.clone()),
            image_id: rec.id,
            config: cfg,
            state: ContainerState::Created,
            created_at_ns: now_ns(),
            started_at_ns: 0,
            finished_at_ns: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            log_path,
            process: spec["process"].clone(),
            bundle,
            rw_dir: rw,
            shim_address: address,
            task_deleted: false,
            oom_killed: false,
        };
        info!(container = %id, pod = %pod.id, name = %c.config.name, "container created");
        save(&self.records, &c);
        let (exited, _) = watch::channel(false);
        self.table.lock().expect("containers lock").insert(
            id.clone(),
            Slot {
                c,
                log_writer: io.log_writer,
                log_file: io.log_file,
                output: io.output,
                stdin: io.stdin,
                exited,
            },
        );
        Ok(id)
    }

    /// The on-disk and shim side of Create; returns the shim's address. `out` gets the log
    /// writer as soon as it runs (for the caller to stop on failure), the log file, and
    /// the stdin FIFO's writer when the container has stdin.
    #[allow(clippy::too_many_arguments)]
    async fn make(
        &self,
        id: &str,
        bundle: &Path,
        rw: &Path,
        (spec, cfg): (&serde_json::Value, &ContainerConfig),
        lowers: &[PathBuf],
        log_path: Option<&Path>,
        out: &mut MadeIo,
    ) -> Result<String, ContainerError> {
        std::fs::create_dir_all(bundle.join("rootfs")).map_err(io_err("create the bundle"))?;
        let json = serde_json::to_vec_pretty(spec).expect("serialize a spec");
        std::fs::write(bundle.join("config.json"), json).map_err(io_err("write config.json"))?;
        let (upper, work) = (rw.join("upper"), rw.join("work"));
        for d in [&upper, &work] {
            std::fs::create_dir_all(d).map_err(io_err(format!("create {}", d.display())))?;
        }
        let log = log_path
            .map(|p| logs::open_log(p).map_err(io_err(format!("open the log {}", p.display()))))
            .transpose()?
            .map(|f| Arc::new(Mutex::new(f)));
        let fifos = logs::make_fifos(bundle, "init").map_err(io_err("make the stdio FIFOs"))?;
        out.log_writer = Some(logs::spawn_writer(
            log.clone(),
            fifos.stdout,
            fifos.stderr,
            out.output.clone(),
        ));
        out.log_file = log;
        let stdin_path = if cfg.stdin {
            let p = logs::make_stdin_fifo(bundle, "init").map_err(io_err("make the stdin FIFO"))?;
            let w = logs::open_stdin_writer(&p).map_err(io_err("open the stdin FIFO"))?;
            out.stdin = Some(Arc::new(ContainerStdin::new(w, cfg.stdin_once)));
            Some(p)
        } else {
            None
        };
        let rootfs = [container_spec::overlay_mount(lowers, &upper, &work)];
        let address = self.launcher.start(id, bundle).await?;
        let shim = Shim::connect(&address).await?;
        shim.create_task(&TaskCreate {
            id,
            bundle,
            config: self.launcher.config.as_deref(),
            rootfs: &rootfs,
            stdin: stdin_path.as_deref(),
            stdout: Some(&fifos.stdout_path),
            // Given with a tty too (containerd gives none): the agent ends a terminal's
            // stderr at once, so the log writer sees EOF on it as for any container.
            stderr: Some(&fifos.stderr_path),
            terminal: cfg.tty,
        })
        .await?;
        Ok(address)
    }

    /// StartContainer; a waiter then records the exit.
    pub async fn start(&self, id: &str) -> Result<(), ContainerError> {
        let c = self
            .get(id)
            .ok_or_else(|| ContainerError::NotFound(id.into()))?;
        if c.state != ContainerState::Created {
            return Err(ContainerError::State {
                id: id.into(),
                state: c.state,
                call: "StartContainer",
                want: "created",
            });
        }
        let started = async {
            let shim = Shim::connect(&c.shim_address).await?;
            shim.start(id).await
        }
        .await;
        if let Err(e) = started {
            let message = e.to_string();
            self.finish(id, 128, "StartError", &message);
            return Err(e.into());
        }
        self.update(id, |c| {
            c.state = ContainerState::Running;
            c.started_at_ns = now_ns();
        });
        self.spawn_waiter(id, &c.shim_address);
        Ok(())
    }

    /// StopContainer: SIGTERM, then SIGKILL after `timeout`. Succeeds for a container that
    /// does not exist or is not running.
    pub async fn stop(&self, id: &str, timeout: Duration) -> Result<(), ContainerError> {
        let Some(c) = self.get(id) else {
            return Ok(());
        };
        if c.state != ContainerState::Running {
            return Ok(());
        }
        let shim = Shim::connect(&c.shim_address).await?;
        if !timeout.is_zero() {
            // An error here is a process that already exited: the wait below says.
            if let Err(e) = shim.signal(id, "", libc::SIGTERM as u32, false).await {
                warn!(container = %id, error = %e, "SIGTERM");
            }
            if self.wait_exited(id, timeout).await {
                return Ok(());
            }
        }
        if let Err(e) = shim.signal(id, "", libc::SIGKILL as u32, true).await {
            warn!(container = %id, error = %e, "SIGKILL");
        }
        if self.wait_exited(id, KILL_GRACE).await {
            Ok(())
        } else {
            Err(ContainerError::StopTimeout {
                id: id.into(),
                after: KILL_GRACE,
            })
        }
    }

    /// Deletes the container's task in the shim (which unmounts its rootfs), once.
    async fn delete_task(&self, c: &Container) {
        if c.task_deleted {
            return;
        }
        let deleted = async {
            let shim = Shim::connect(&c.shim_address).await?;
            shim.delete(&c.id).await
        }
        .await;
        if let Err(e) = deleted {
            // A shim that is gone took the task with it; `remove_dirs` unmounts the rootfs.
            warn!(container = %c.id, error = %e, "delete the task");
        }
        self.update(&c.id, |c| c.task_deleted = true);
    }

    /// RemoveContainer: stops it (at once) if running, deletes its task and directories and
    /// forgets it. Succeeds for a container that does not exist. The log file stays
    /// (kubelet owns it).
    pub async fn remove(&self, id: &str) -> Result<(), ContainerError> {
        if self.get(id).is_none() {
            return Ok(());
        }
        self.stop(id, Duration::ZERO).await?;
        let Some(c) = self.get(id) else {
            return Ok(());
        };
        self.delete_task(&c).await;
        self.cpu_samples.forget(id);
        if let Err(e) = self.records.remove(id) {
            warn!(container = %id, error = %e, "forget the container's record");
        }
        let slot = self.table.lock().expect("containers lock").remove(id);
        if let Some(w) = slot.and_then(|s| s.log_writer) {
            w.abort();
        }
        remove_dirs(&c.bundle, &c.rw_dir);
        info!(container = %id, "container removed");
        Ok(())
    }

    /// For StopPodSandbox: every container of the pod stopped at once and its task deleted,
    /// so the pod's shim holds only the sandbox task when the pod goes.
    pub async fn stop_pod(&self, pod_id: &str) -> Result<(), ContainerError> {
        let f = Filter {
            pod_id: pod_id.into(),
            ..Default::default()
        };
        for c in self.list(&f) {
            self.stop(&c.id, Duration::ZERO).await?;
            if let Some(c) = self.get(&c.id) {
                self.delete_task(&c).await;
            }
        }
        Ok(())
    }

    /// For RemovePodSandbox: every container of the pod removed.
    pub async fn remove_pod(&self, pod_id: &str) -> Result<(), ContainerError> {
        let f = Filter {
            pod_id: pod_id.into(),
            ..Default::default()
        };
        for c in self.list(&f) {
            self.remove(&c.id).await?;
        }
        Ok(())
    }
}

/// A process on a terminal, as containerd's `oci.WithTTY` makes it: `terminal` and
/// `TERM=xterm`.
pub(crate) fn with_tty(process: &mut serde_json::Value) {
    process["terminal"] = true.into();
    if let Some(env) = process["env"].as_array_mut() {
        env.push("TERM=xterm".into());
    } else {
        process["env"] = serde_json::json!(["TERM=xterm"]);
    }
}

/// Records a container's state. A failed write is logged, not fatal: the container runs
/// either way, and only a huskd restart would miss the change.
fn save(records: &Records, c: &Container) {
    if let Err(e) = records.save(&c.id, c) {
        warn!(container = %c.id, error = %e, "record the container");
    }
}
