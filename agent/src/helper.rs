//! The runtime helper: a short-lived, single-threaded `husk-agent __runtime <workdir>`
//! process that does the libcontainer operations which clone(2) new processes.
//!
//! Why a separate process: libcontainer creates containers with raw `clone3`, and the child
//! then allocates and logs. Done from the agent itself, which is multi-threaded (tokio), the
//! child could inherit a lock (malloc arena, log writer) held by another thread at the moment
//! of the clone and deadlock. A fresh single-threaded process has no such locks. The helper
//! exits right after creating the process; the container process is re-parented to the agent
//! (PID 1 in the guest, a child subreaper on a host), which reaps it.
//!
//! The agent writes `request.json` into the work directory and starts the helper with the
//! container's stdio as the helper's own fds 0-2 (the container inherits them); the helper
//! writes `result.json` and logs to `helper.log` there.

use std::fs;
use std::path::{Path, PathBuf};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};

use crate::exec_seccomp::SeccompExecutor;

/// What the agent asks the helper to do.
#[derive(Debug, Serialize, Deserialize)]
pub enum HelperRequest {
    /// Create (not start) a container from the bundle; answers the init pid.
    Create {
        id: String,
        root: PathBuf,
        bundle: PathBuf,
        console_socket: Option<PathBuf>,
        /// MS_MOVE + chroot instead of pivot_root (a root on the initramfs).
        no_pivot: bool,
    },
    /// Start a process in a running container; answers its pid.
    Exec {
        container_id: String,
        root: PathBuf,
        process_json: PathBuf,
        console_socket: Option<PathBuf>,
    },
    /// Create a network namespace and bind-mount it at `path` (host mode's sandbox netns).
    Netns { path: PathBuf },
}

/// The helper's answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum HelperResult {
    /// Success; the new process's pid where there is one.
    Ok { pid: Option<i32> },
    /// Failure, with libcontainer's error chain.
    Err { message: String },
}

/// File names inside the helper's work directory.
pub const REQUEST_FILE: &str = "request.json";
/// See [`REQUEST_FILE`].
pub const RESULT_FILE: &str = "result.json";
/// See [`REQUEST_FILE`].
pub const LOG_FILE: &str = "helper.log";

/// Entry point of `husk-agent __runtime <workdir>`; returns the process exit code.
pub fn main(workdir: &Path) -> i32 {
    if let Ok(log) = fs::File::create(workdir.join(LOG_FILE)) {
        let _ = tracing_subscriber::fmt()
            .with_writer(std::sync::Mutex::new(log))
            .with_ansi(false)
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("HUSK_AGENT_LOG")
                    .unwrap_or_else(|_| "warn".into()),
            )
            .try_init();
    }
    let result = match fs::read(workdir.join(REQUEST_FILE)) {
        Ok(bytes) => match serde_json::from_slice::<HelperRequest>(&bytes) {
            Ok(req) => run(req),
            Err(e) => HelperResult::Err {
                message: format!("bad helper request: {e}"),
            },
        },
        Err(e) => HelperResult::Err {
            message: format!("read helper request: {e}"),
        },
    };
    let code = i32::from(matches!(result, HelperResult::Err { .. }));
    let json = serde_json::to_vec(&result).unwrap_or_default();
    if fs::write(workdir.join(RESULT_FILE), json).is_err() {
        return 2;
    }
    code
}

fn run(req: HelperRequest) -> HelperResult {
    let r: Result<Option<i32>, String> = match req {
        HelperRequest::Create {
            id,
            root,
            bundle,
            console_socket,
            no_pivot,
        } => create(id, &root, &bundle, console_socket, no_pivot),
        HelperRequest::Exec {
            container_id,
            root,
            process_json,
            console_socket,
        } => exec(container_id, &root, &process_json, console_socket),
        HelperRequest::Netns { path } => netns(&path).map(|_| None),
    };
    match r {
        Ok(pid) => HelperResult::Ok { pid },
        Err(message) => HelperResult::Err { message },
    }
}

/// Formats an error with its whole source chain: libcontainer's top-level errors are terse.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn create(
    id: String,
    root: &Path,
    bundle: &Path,
    console_socket: Option<PathBuf>,
    no_pivot: bool,
) -> Result<Option<i32>, String> {
    let container = ContainerBuilder::new(id, SyscallType::default())
        .with_root_path(root)
        .map_err(|e| chain(&e))?
        .with_console_socket(console_socket)
        .as_init(bundle)
        .with_systemd(false)
        .with_detach(true)
        .with_no_pivot(no_pivot)
        .build()
        .map_err(|e| chain(&e))?;
    Ok(container.pid().map(|p| p.as_raw()))
}

fn exec(
    container_id: String,
    root: &Path,
    process_json: &Path,
    console_socket: Option<PathBuf>,
) -> Result<Option<i32>, String> {
    // The spec libcontainer created the container from: its seccomp filter is the exec'd
    // process's too (exec_seccomp.rs).
    let container = Container::load(root.join(&container_id)).map_err(|e| chain(&e))?;
    let spec_path = container.bundle().join("config.json");
    let spec = Spec::load(&spec_path).map_err(|e| {
        format!(
            "read the container's spec {}: {}",
            spec_path.display(),
            chain(&e)
        )
    })?;
    let mut builder = ContainerBuilder::new(container_id, SyscallType::default())
        .with_root_path(root)
        .map_err(|e| chain(&e))?
        .with_console_socket(console_socket);
    if let Some(executor) = SeccompExecutor::for_container(&spec) {
        builder = builder.with_executor(executor);
    }
    let pid = builder
        .as_tenant()
        .with_detach(true)
        .with_process(Some(process_json))
        .build()
        .map_err(|e| chain(&e))?;
    Ok(Some(pid.as_raw()))
}

fn netns(path: &Path) -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    use nix::sched::{unshare, CloneFlags};
    fs::File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("unshare(CLONE_NEWNET): {e}"))?;
    mount(
        Some("/proc/self/ns/net"),
        path,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| format!("bind-mount netns at {}: {e}", path.display()))?;
    // Bring loopback up so containers in the sandbox can talk over 127.0.0.1.
    let status = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        tracing::warn!("could not bring lo up in the sandbox netns");
    }
    Ok(())
}
