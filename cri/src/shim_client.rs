//! Starting our shim and speaking shim v2 to it, exactly as containerd 1.6 does: `start`
//! with `-namespace -address -publish-binary -id` in the bundle directory (the runtime
//! options, naming huskd's config file, as a protobuf `Any` on stdin), the printed address
//! dialled over ttrpc, the Task API on it, and `delete` with `-bundle` to clean up a shim
//! that is gone. huskd links only the protocol, never the sandbox layer.

use crate::metrics;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim_async::{Client, TaskClient};
use containerd_shim_protos::ttrpc::context;
use tokio::io::AsyncWriteExt;

/// The message type of the runtime options (`runtimeoptions.v1.Options`).
const OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("shim {binary}: start failed: {message}")]
    Start { binary: PathBuf, message: String },
    #[error("shim at {address}: connect: {message}")]
    Connect { address: String, message: String },
    #[error("shim task {call}: {message}")]
    Call { call: &'static str, message: String },
    #[error("shim {binary}: delete failed: {message}")]
    Delete { binary: PathBuf, message: String },
}

/// The type of an exec's process spec (containerd's name for the OCI Process).
const PROCESS_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";
/// The type of an Update's resources (containerd's name for the OCI LinuxResources).
const RESOURCES_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";

/// A task's usage, from the shim's Stats (cgroup v2 metrics of the container in the guest).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskStats {
    pub cpu_usage_usec: u64,
    pub memory_usage_bytes: u64,
    pub memory_limit_bytes: u64,
    pub pids: u64,
}

/// A task Create: the bundle, the rootfs mounts and the output FIFOs.
pub struct TaskCreate<'a> {
    pub id: &'a str,
    pub bundle: &'a Path,
    pub config: Option<&'a Path>,
    pub rootfs: &'a [crate::container_spec::RootfsMount],
    pub stdin: Option<&'a Path>,
    pub stdout: Option<&'a Path>,
    pub stderr: Option<&'a Path>,
    /// The process has a terminal (its spec says so too): stdout carries all its output.
    pub terminal: bool,
}

/// An exec's stdio FIFOs (None: the stream is not wanted) and whether it has a terminal.
pub struct ExecStdio<'a> {
    pub stdin: Option<&'a Path>,
    pub stdout: Option<&'a Path>,
    pub stderr: Option<&'a Path>,
    pub terminal: bool,
}

/// How huskd runs the shim binary.
#[derive(Clone, Debug)]
pub struct ShimLauncher {
    pub binary: PathBuf,
    /// `-namespace` (containerd's namespace; ours is fixed).
    pub namespace: String,
    /// `-address`: where the shim may publish events over ttrpc (`<address>.ttrpc`).
    pub address: String,
    /// `-publish-binary`: the fallback event publisher.
    pub publish_binary: PathBuf,
    /// The husk.toml the shim reads (sent as the runtime options' ConfigPath).
    pub config: Option<PathBuf>,
}

/// A protobuf varint.
fn varint(mut n: usize, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// `runtimeoptions.v1.Options{config_path}` as an `Any` (field 2, a string: by hand, as the
/// shim decodes it by hand).
fn options_any(config: &Path) -> Any {
    let path = config.to_string_lossy();
    let mut value = vec![0x12];
    varint(path.len(), &mut value);
    value.extend_from_slice(path.as_bytes());
    Any {
        type_url: OPTIONS_TYPE.into(),
        value,
        ..Default::default()
    }
}

impl ShimLauncher {
    fn command(&self, id: &str, bundle: &Path) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.binary);
        c.arg("-namespace")
            .arg(&self.namespace)
            .arg("-address")
            .arg(&self.address)
            .arg("-publish-binary")
            .arg(&self.publish_binary)
            .arg("-id")
            .arg(id)
            .current_dir(bundle)
            .env("TTRPC_ADDRESS", format!("{}.ttrpc", self.address))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    /// Runs `start` in `bundle` (which holds config.json); returns the address it printed.
    pub async fn start(&self, id: &str, bundle: &Path) -> Result<String, ShimError> {
        let fail = |message: String| {
            metrics::inc(&metrics::METRICS.shim_errors);
            ShimError::Start {
                binary: self.binary.clone(),
                message,
            }
        };
        let mut cmd = self.command(id, bundle);
        cmd.arg("start").stdin(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| fail(e.to_string()))?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        if let Some(config) = &self.config {
            let any = options_any(config)
                .write_to_bytes()
                .map_err(|e| fail(e.to_string()))?;
            stdin
                .write_all(&any)
                .await
                .map_err(|e| fail(e.to_string()))?;
        }
        drop(stdin);
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| fail(e.to_string()))?;
        // containerd reads stdout and stderr together (CombinedOutput) and dials the rest.
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .trim()
        .to_string();
        if !out.status.success() {
            return Err(fail(format!("{text} ({})", out.status)));
        }
        Ok(text)
    }

    /// Runs `delete` (cleanup of a shim that is gone or failed), as containerd does.
    pub async fn delete(&self, id: &str, bundle: &Path) -> Result<(), ShimError> {
        let mut cmd = self.command(id, bundle);
        cmd.arg("-bundle")
            .arg(bundle)
            .arg("delete")
            .stdin(Stdio::null());
        let out = cmd.output().await.map_err(|e| ShimError::Delete {
            binary: self.binary.clone(),
            message: e.to_string(),
        })?;
        if !out.status.success() {
            return Err(ShimError::Delete {
                binary: self.binary.clone(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }
}

/// A ttrpc connection to one shim.
pub struct Shim {
    client: TaskClient,
}

fn ctx() -> context::Context {
    context::with_timeout(CALL_TIMEOUT.as_nanos() as i64)
}

fn call_err(call: &'static str) -> impl FnOnce(containerd_shim_protos::ttrpc::Error) -> ShimError {
    move |e| {
        metrics::inc(&metrics::METRICS.shim_errors);
        call_error(call, e)
    }
}

fn call_error(call: &'static str, e: containerd_shim_protos::ttrpc::Error) -> ShimError {
    ShimError::Call {
        call,
        message: match e {
            containerd_shim_protos::ttrpc::Error::RpcStatus(s) => s.message().to_string(),
            e => e.to_string(),
        },
    }
}

impl Shim {
    pub async fn connect(address: &str) -> Result<Shim, ShimError> {
        let client = Client::connect(address).await.map_err(|e| {
            metrics::inc(&metrics::METRICS.shim_errors);
            ShimError::Connect {
                address: address.into(),
                message: e.to_string(),
            }
        })?;
        Ok(Shim {
            client: TaskClient::new(client),
        })
    }

    /// Create of a task whose bundle holds config.json; `config` rides along as the
    /// runtime options, as containerd sends them. Returns the task's pid.
    pub async fn create(
        &self,
        id: &str,
        bundle: &Path,
        config: Option<&Path>,
    ) -> Result<u32, ShimError> {
        self.create_task(&TaskCreate {
            id,
            bundle,
            config,
            rootfs: &[],
            stdin: None,
            stdout: None,
            stderr: None,
            terminal: false,
        })
        .await
    }

    /// Create with rootfs mounts and stdio FIFOs (an app container).
    pub async fn create_task(&self, t: &TaskCreate<'_>) -> Result<u32, ShimError> {
        let fifo = |p: Option<&Path>| p.map(|p| p.to_string_lossy().into_owned());
        let req = api::CreateTaskRequest {
            id: t.id.into(),
            bundle: t.bundle.to_string_lossy().into_owned(),
            options: MessageField::from_option(t.config.map(options_any)),
            rootfs: t
                .rootfs
                .iter()
                .map(|m| containerd_shim_protos::types::mount::Mount {
                    type_: m.kind.clone(),
                    source: m.source.clone(),
                    options: m.options.clone(),
                    ..Default::default()
                })
                .collect(),
            stdin: fifo(t.stdin).unwrap_or_default(),
            stdout: fifo(t.stdout).unwrap_or_default(),
            stderr: fifo(t.stderr).unwrap_or_default(),
            terminal: t.terminal,
            ..Default::default()
        };
        let r = self
            .client
            .create(ctx(), &req)
            .await
            .map_err(call_err("Create"))?;
        Ok(r.pid)
    }

    /// Registers an exec process (`process` is the OCI Process as JSON), output to FIFOs.
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: &serde_json::Value,
        stdout: &Path,
        stderr: &Path,
    ) -> Result<(), ShimError> {
        let stdio = ExecStdio {
            stdin: None,
            stdout: Some(stdout),
            stderr: Some(stderr),
            terminal: false,
        };
        self.exec_stdio(id, exec_id, process, &stdio).await
    }

    /// Registers an exec process with any of the three FIFOs and, maybe, a terminal.
    pub async fn exec_stdio(
        &self,
        id: &str,
        exec_id: &str,
        process: &serde_json::Value,
        stdio: &ExecStdio<'_>,
    ) -> Result<(), ShimError> {
        let fifo = |p: Option<&Path>| p.map(|p| p.to_string_lossy().into_owned());
        let req = api::ExecProcessRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            stdin: fifo(stdio.stdin).unwrap_or_default(),
            stdout: fifo(stdio.stdout).unwrap_or_default(),
            stderr: fifo(stdio.stderr).unwrap_or_default(),
            terminal: stdio.terminal,
            spec: MessageField::some(Any {
                type_url: PROCESS_TYPE.into(),
                value: serde_json::to_vec(process).expect("serialize a process"),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.client
            .exec(ctx(), &req)
            .await
            .map_err(call_err("Exec"))?;
        Ok(())
    }

    /// ResizePty: the terminal size of a process (`exec_id` empty: the container's own).
    pub async fn resize_pty(
        &self,
        id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), ShimError> {
        let req = api::ResizePtyRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            width,
            height,
            ..Default::default()
        };
        self.client
            .resize_pty(ctx(), &req)
            .await
            .map_err(call_err("ResizePty"))?;
        Ok(())
    }

    /// CloseIO of stdin: the process reads EOF (containerd's `WithStdinCloser`).
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), ShimError> {
        let req = api::CloseIORequest {
            id: id.into(),
            exec_id: exec_id.into(),
            stdin: true,
            ..Default::default()
        };
        self.client
            .close_io(ctx(), &req)
            .await
            .map_err(call_err("CloseIO"))?;
        Ok(())
    }

    /// Starts an exec process.
    pub async fn start_exec(&self, id: &str, exec_id: &str) -> Result<u32, ShimError> {
        let req = api::StartRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        let r = self
            .client
            .start(ctx(), &req)
            .await
            .map_err(call_err("Start"))?;
        Ok(r.pid)
    }

    /// Waits, with no deadline, until the process exits; returns its exit status.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<u32, ShimError> {
        let req = api::WaitRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        let r = self
            .client
            .wait(context::Context::default(), &req)
            .await
            .map_err(call_err("Wait"))?;
        Ok(r.exit_status)
    }

    /// Signals one process (`all`: every process of the container).
    pub async fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), ShimError> {
        let req = api::KillRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            signal,
            all,
            ..Default::default()
        };
        self.client
            .kill(ctx(), &req)
            .await
            .map_err(call_err("Kill"))?;
        Ok(())
    }

    /// Deletes an exited process (`exec_id` empty: the container's init).
    pub async fn delete_exec(&self, id: &str, exec_id: &str) -> Result<(), ShimError> {
        let req = api::DeleteRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.client
            .delete(ctx(), &req)
            .await
            .map_err(call_err("Delete"))?;
        Ok(())
    }

    pub async fn start(&self, id: &str) -> Result<u32, ShimError> {
        let req = api::StartRequest {
            id: id.into(),
            ..Default::default()
        };
        let r = self
            .client
            .start(ctx(), &req)
            .await
            .map_err(call_err("Start"))?;
        Ok(r.pid)
    }

    /// Signals every process of the container.
    pub async fn kill(&self, id: &str, signal: u32) -> Result<(), ShimError> {
        self.signal(id, "", signal, true).await
    }

    /// Deletes an exited container's task (its init process).
    pub async fn delete(&self, id: &str) -> Result<(), ShimError> {
        self.delete_exec(id, "").await
    }

    /// Update of a task's resources; `resources` is the OCI LinuxResources as JSON.
    pub async fn update(&self, id: &str, resources: &serde_json::Value) -> Result<(), ShimError> {
        let req = api::UpdateTaskRequest {
            id: id.into(),
            resources: MessageField::some(Any {
                type_url: RESOURCES_TYPE.into(),
                value: serde_json::to_vec(resources).expect("serialize resources"),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.client
            .update(ctx(), &req)
            .await
            .map_err(call_err("Update"))?;
        Ok(())
    }

    /// A task's usage (the shim answers with cgroup v2 metrics).
    pub async fn stats(&self, id: &str) -> Result<TaskStats, ShimError> {
        use containerd_shim_protos::cgroups_v2::metrics::Metrics;
        let req = api::StatsRequest {
            id: id.into(),
            ..Default::default()
        };
        let r = self
            .client
            .stats(ctx(), &req)
            .await
            .map_err(call_err("Stats"))?;
        let bad = |message: String| ShimError::Call {
            call: "Stats",
            message,
        };
        let any = r
            .stats
            .into_option()
            .ok_or_else(|| bad("no stats".into()))?;
        let m = Metrics::parse_from_bytes(&any.value)
            .map_err(|e| bad(format!("{} is not cgroup v2 metrics: {e}", any.type_url)))?;
        Ok(TaskStats {
            cpu_usage_usec: m.cpu.as_ref().map_or(0, |c| c.usage_usec),
            memory_usage_bytes: m.memory.as_ref().map_or(0, |c| c.usage),
            memory_limit_bytes: m.memory.as_ref().map_or(0, |c| c.usage_limit),
            pids: m.pids.as_ref().map_or(0, |c| c.current),
        })
    }

    /// Asks the shim to exit (it does once it holds no task).
    pub async fn shutdown(&self, id: &str) -> Result<(), ShimError> {
        let req = api::ShutdownRequest {
            id: id.into(),
            ..Default::default()
        };
        // The shim may exit before it answers: a dropped connection is the expected end.
        let _ = self.client.shutdown(ctx(), &req).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_any_is_what_the_shim_decodes() {
        let a = options_any(Path::new("/etc/husk/husk.toml"));
        assert_eq!(a.type_url, OPTIONS_TYPE);
        let mut want = vec![0x12, 19];
        want.extend_from_slice(b"/etc/husk/husk.toml");
        assert_eq!(a.value, want);
        let mut long = Vec::new();
        varint(300, &mut long);
        assert_eq!(long, [0xac, 0x02]);
    }
}
