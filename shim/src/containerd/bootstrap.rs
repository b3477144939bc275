//! The shim v2 bootstrap as containerd 1.6 runs it: `start`, `delete`, and the long-lived
//! server (our own `serve` action, which `start` spawns).
//!
//! Why not `containerd_shim::run`: the 0.12 crate speaks containerd 2's protocol. Its `start`
//! prints a JSON reply (`{"version":3,...}`) where containerd 1.6 dials the trimmed output as
//! the address, and its task service is registered only as `containerd.task.v3.Task`, a
//! name containerd 1.6 does not call. It also makes the shim a subreaper that reaps every
//! child with `waitpid(-1)`, which would steal the VMM's exit status. So the bootstrap is
//! ours; the crate still gives us flag parsing, the protos (one ttrpc, 0.10), the generated
//! service, the remote publisher and its `ExitSignal`. Nothing here reaps: each child is
//! waited for by whoever spawned it.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use containerd_shim::protos::api::DeleteResponse;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim_async::create_task;
use containerd_shim::protos::ttrpc::r#async::transport::Listener;
use containerd_shim::protos::ttrpc::r#async::Server;
use containerd_shim::{ExitSignal, Flags};

use super::config::Config;
use super::error::{Error, Result};
use super::events::Publisher;
use super::options::RuntimeOptions;
use super::runtime::PodRuntime;
use super::service::TaskService;
use super::tasks::{kind_of, Kind};

/// Our daemon's action name (containerd only ever passes `start` and `delete`).
pub const SERVE_ACTION: &str = "serve";
/// The fd the daemon's listening socket arrives on.
const LISTEN_FD: i32 = 3;
/// Environment telling the daemon that fd 3 is its socket.
const LISTEN_FD_ENV: &str = "HUSK_SHIM_LISTEN_FD";
/// containerd's names for the two task services; the messages are the same.
const TASK_V3: &str = "containerd.task.v3.Task";
const TASK_V2: &str = "containerd.task.v2.Task";

/// A short deterministic name: the socket name only has to be the same for every `start` of
/// a pod and distinct between pods, not cryptographic; two 64-bit FNV-1a style lanes.
fn name_hash(input: &str) -> String {
    let mut a: u64 = 0xcbf2_9ce4_8422_2325;
    let mut b: u64 = 0x8422_2325_cbf2_9ce4;
    for byte in input.bytes() {
        a = (a ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3);
        b = (b ^ byte as u64)
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(5);
    }
    format!("{a:016x}{b:016x}")
}

/// The socket of the shim serving `sandbox_id`: the same for every container of the pod,
/// whichever `start` computes it. Under the husk run root (`/run/husk/s/<hash>`).
pub fn socket_path(containerd_address: &str, namespace: &str, sandbox_id: &str) -> PathBuf {
    crate::paths::run_root().join("s").join(name_hash(&format!(
        "{containerd_address}/{namespace}/{sandbox_id}"
    )))
}

fn address_of(path: &Path) -> String {
    format!("unix://{}", path.display())
}

/// `start`: prints the address of the pod's shim (spawning it for a sandbox) and returns.
/// `stdin` is the runtime options containerd sent, if any.
pub fn start(flags: &Flags, stdin: &[u8]) -> Result<String> {
    let bundle = std::env::current_dir().map_err(|e| Error::io("current directory", e))?;
    let spec = read_spec(&bundle)?;
    let (kind, sandbox_id) = kind_of(&spec, &flags.id);
    let socket = socket_path(&flags.address, &flags.namespace, &sandbox_id);
    let address = address_of(&socket);
    if kind == Kind::Container {
        // The sandbox's shim serves this container too; containerd connects to it again.
        write_address(&bundle, &address)?;
        return Ok(address);
    }
    // Load the config now: an error in it fails RunPodSandbox with a message, instead of a
    // daemon that dies where nobody sees.
    let options = RuntimeOptions::from_stdin_bytes(stdin)?;
    let config_path = options.map(|o| o.config_path).filter(|p| !p.is_empty());
    let (path, named) = Config::locate(config_path.as_deref());
    Config::load(config_path.as_deref())?;
    // The daemon reads the same file; a default path stays a default (may be absent).
    let path = named.then_some(path);

    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        // A shim already serves this sandbox (a retried start).
        write_address(&bundle, &address)?;
        return Ok(address);
    }
    let _ = std::fs::remove_file(&socket);
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    }
    // Bound here, before containerd dials it; the daemon inherits the listening socket.
    let listener = UnixListener::bind(&socket)
        .map_err(|e| Error::io(format!("bind {}", socket.display()), e))?;
    let spawned = spawn_daemon(flags, &bundle, listener, path.as_deref());
    if let Err(e) = spawned {
        let _ = std::fs::remove_file(&socket);
        return Err(e);
    }
    write_address(&bundle, &address)?;
    Ok(address)
}

fn read_spec(bundle: &Path) -> Result<serde_json::Value> {
    let p = bundle.join("config.json");
    let text = std::fs::read(&p).map_err(|e| Error::io(format!("read {}", p.display()), e))?;
    serde_json::from_slice(&text)
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", p.display())))
}

fn write_address(bundle: &Path, address: &str) -> Result<()> {
    let p = bundle.join("address");
    std::fs::write(&p, address).map_err(|e| Error::io(format!("write {}", p.display()), e))
}

/// Starts the long-lived server: a new session, stdin from /dev/null, stdout and stderr to
/// the bundle's `log` FIFO (containerd copies it into its own log) or /dev/null — never
/// `start`'s pipes, which containerd reads to EOF.
fn spawn_daemon(
    flags: &Flags,
    bundle: &Path,
    listener: UnixListener,
    config: Option<&Path>,
) -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| Error::io("find the shim binary", e))?;
    let log = open_log_fifo(bundle);
    let (out, err) = match &log {
        Some(f) => (
            Stdio::from(
                f.try_clone()
                    .map_err(|e| Error::io("dup the log fifo", e))?,
            ),
            Stdio::from(
                f.try_clone()
                    .map_err(|e| Error::io("dup the log fifo", e))?,
            ),
        ),
        None => (Stdio::null(), Stdio::null()),
    };
    let mut cmd = Command::new(exe);
    cmd.current_dir(bundle)
        .args(["-namespace", &flags.namespace, "-id", &flags.id])
        .args([
            "-address",
            &flags.address,
            "-publish-binary",
            &flags.publish_binary,
        ]);
    if flags.debug {
        cmd.arg("-debug");
    }
    cmd.arg(SERVE_ACTION)
        .env(LISTEN_FD_ENV, LISTEN_FD.to_string());
    if let Some(config) = config {
        cmd.env(super::config::ENV_VAR, config);
    }
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let fd = listener.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls (setsid, dup2, fcntl).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if fd == LISTEN_FD {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            } else if libc::dup2(fd, LISTEN_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| Error::io("spawn the shim daemon", e))?;
    let pidfile = bundle.join("shim.pid");
    std::fs::write(&pidfile, child.id().to_string())
        .map_err(|e| Error::io(format!("write {}", pidfile.display()), e))?;
    // Not waited for: it outlives `start` (re-parented to init or a subreaper).
    drop(child);
    Ok(())
}

/// The bundle's `log` FIFO, opened for writing without blocking (containerd has its read
/// end open during `start`), then switched to blocking writes so no log line is dropped.
fn open_log_fifo(bundle: &Path) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(bundle.join("log"))
        .ok()?;
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
    }
    Some(f)
}

/// `delete`: cleans up after a dead shim from what is on disk and returns containerd's
/// DeleteResponse (exit status 128 + SIGKILL, as runc's shim reports a killed task).
pub fn delete(flags: &Flags) -> Result<DeleteResponse> {
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir().map_err(|e| Error::io("current directory", e))?
    } else {
        PathBuf::from(&flags.bundle)
    };
    let (kind, sandbox_id) = match read_spec(&bundle) {
        Ok(spec) => kind_of(&spec, &flags.id),
        Err(_) => (Kind::Sandbox, flags.id.clone()),
    };
    let rootfs = bundle.join("rootfs");
    if let Ok(c) = std::ffi::CString::new(rootfs.as_os_str().as_encoded_bytes()) {
        // SAFETY: unmounting the bundle's own rootfs mount point; EINVAL if not mounted.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    if kind == Kind::Sandbox {
        if let Ok(pid) = std::fs::read_to_string(bundle.join("shim.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                if pid > 1 && is_our_shim(pid) {
                    // SAFETY: a signal to the pid our start recorded, checked to be our binary.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = std::fs::remove_file(socket_path(&flags.address, &flags.namespace, &sandbox_id));
        cleanup_sandbox_state(&flags.namespace, &sandbox_id);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Ok(DeleteResponse {
        pid: 0,
        exit_status: 128 + libc::SIGKILL as u32,
        exited_at: Some(
            containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp {
                seconds: now.as_secs() as i64,
                nanos: now.subsec_nanos() as i32,
                ..Default::default()
            },
        )
        .into(),
        ..Default::default()
    })
}

/// Whether `pid` runs this shim's binary (a recycled pid must not be killed).
fn is_our_shim(pid: i32) -> bool {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"));
    match (exe, std::env::current_exe()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Removes everything a dead shim's sandbox left: the VM's processes, taps, netns, host
/// cgroup and directory from the sandbox layer's state (`/run/husk/sandbox/<id>/state.json`),
/// then the share mounts and the share this shim made ([`super::sandbox_state`]'s file).
/// In that order: the latter removes the former's directory, state included. Nothing to do
/// after a clean teardown (neither exists).
pub fn cleanup_sandbox_state(namespace: &str, sandbox_id: &str) {
    let id = super::vm_runtime::sandbox_vm_id(sandbox_id);
    if let Err(e) = crate::sandbox::Sandbox::cleanup_from_state(&id) {
        tracing::warn!(%namespace, %sandbox_id, "clean up the sandbox from its state: {e}");
    }
    super::sandbox_state::cleanup(&super::sandbox_state::path(namespace, sandbox_id));
}

/// Writes a DeleteResponse to stdout as containerd reads it (raw protobuf).
pub fn print_delete_response(r: &DeleteResponse) -> Result<()> {
    let bytes = r
        .write_to_bytes()
        .map_err(|e| Error::Other(format!("encode DeleteResponse: {e}")))?;
    let mut out = std::io::stdout();
    out.write_all(&bytes)
        .and_then(|_| out.flush())
        .map_err(|e| Error::io("write the DeleteResponse", e))
}

/// Reads `start`'s stdin (the runtime options), unless it is a terminal.
pub fn read_stdin() -> Vec<u8> {
    use std::io::IsTerminal;
    let mut buf = Vec::new();
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let _ = stdin.lock().take(1 << 20).read_to_end(&mut buf);
    }
    buf
}

/// The daemon: serves the task service on the inherited socket until the last task is
/// gone and containerd said Shutdown.
pub async fn serve<R: PodRuntime>(flags: &Flags, runtime: R) -> Result<()> {
    if std::env::var(LISTEN_FD_ENV).ok().as_deref() != Some("3") {
        return Err(Error::InvalidArgument(format!(
            "the {SERVE_ACTION} action is started by `start` only"
        )));
    }
    // SAFETY: `start` put our listening socket on fd 3 and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FD) };
    let listener = UnixListener::from(fd);
    let socket = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
    let config = Config::load(None)?;
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").unwrap_or_default();
    let publisher = Publisher::connect(
        &ttrpc_address,
        &flags.namespace,
        &flags.publish_binary,
        &flags.address,
    )
    .await;
    let exit = Arc::new(ExitSignal::default());
    let service: Arc<dyn containerd_shim::protos::shim_async::Task + Send + Sync> =
        Arc::new(TaskService::new(
            runtime,
            publisher,
            &flags.namespace,
            exit.clone(),
            Some(config),
        ));
    let mut services = create_task(service.clone());
    let v2 = create_task(service)
        .remove(TASK_V3)
        .ok_or_else(|| Error::Other(format!("generated service is not {TASK_V3}")))?;
    services.insert(TASK_V2.to_string(), v2);
    let listener = Listener::try_from(listener).map_err(|e| Error::io("ttrpc listener", e))?;
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(services);
    server
        .start()
        .await
        .map_err(|e| Error::Other(format!("start the ttrpc server: {e}")))?;
    tracing::info!(id = %flags.id, "husk shim serving");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::io("SIGTERM handler", e))?;
    tokio::select! {
        _ = exit.wait() => {}
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
    }
    // Let the Shutdown answer go out before the connections close.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let _ = server.shutdown().await;
    if let Some(s) = socket {
        let _ = std::fs::remove_file(s);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_is_per_pod_and_short_enough() {
        let a = socket_path("/run/containerd/containerd.sock", "k8s.io", "pod1");
        assert_eq!(
            a,
            socket_path("/run/containerd/containerd.sock", "k8s.io", "pod1")
        );
        assert_ne!(
            a,
            socket_path("/run/containerd/containerd.sock", "k8s.io", "pod2")
        );
        assert_ne!(
            a,
            socket_path("/run/containerd/containerd.sock", "default", "pod1")
        );
        // sun_path holds 108 bytes
        assert!(a.as_os_str().len() < 100, "{}", a.display());
    }
}
