//! `husk run`: one command in a container in a fresh microVM, its output streamed back, its
//! exit status returned, and the VM torn down.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use husk_agent_client::{Agent, Rootfs};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::sandbox::vm::{ShareSpec, VmSpec};
use crate::sandbox::{Result, Sandbox, SandboxConfig, SandboxError};
use crate::spec;

/// The command `husk run` runs when given none.
pub const DEFAULT_COMMAND: &[&str] = &["sh", "-c", "echo hello from a husk microVM; uname -a"];

/// The share tag of a `--image DIR` root filesystem.
const IMAGE_SHARE_TAG: &str = "rootfs";
/// The container's id inside the VM.
const CONTAINER_ID: &str = "main";

/// What to run, and in what.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Root filesystem directory on the host (shared over virtio-fs); `None` uses the
    /// busybox image embedded in the guest.
    pub image: Option<PathBuf>,
    /// The command; empty runs [`DEFAULT_COMMAND`].
    pub args: Vec<String>,
    /// Extra `NAME=value` environment for the process.
    pub env: Vec<String>,
    /// Forward our stdin to the process (otherwise it reads EOF).
    pub stdin: bool,
    pub vm: VmSpec,
    /// How long the guest gets from VMM start to its agent answering.
    pub boot_timeout: Duration,
}

impl RunOptions {
    /// Defaults: the embedded image, the default command, the default pod VM.
    pub fn new() -> Result<RunOptions> {
        Ok(RunOptions {
            image: None,
            args: Vec::new(),
            env: Vec::new(),
            stdin: false,
            vm: VmSpec::pod_default()?,
            boot_timeout: Duration::from_secs(120),
        })
    }
}

/// Runs the command and returns its exit status (128 + signal when killed). Output goes to
/// our stdout and stderr as it comes. The VM is gone when this returns, error or not.
pub async fn run(mut opts: RunOptions) -> Result<i32> {
    for e in &opts.env {
        if !e.contains('=') || e.starts_with('=') {
            return Err(SandboxError::Invalid(format!(
                "environment variable {e:?} must be NAME=value"
            )));
        }
    }
    let rootfs: Rootfs = match &opts.image {
        Some(dir) => {
            let dir = dir.canonicalize().map_err(|e| {
                SandboxError::Invalid(format!("image directory {}: {e}", dir.display()))
            })?;
            if !dir.join("bin").is_dir() && !dir.join("usr").is_dir() {
                return Err(SandboxError::Invalid(format!(
                    "{} does not look like a root filesystem (no bin/ or usr/)",
                    dir.display()
                )));
            }
            opts.vm.shares.push(ShareSpec {
                tag: IMAGE_SHARE_TAG.into(),
                dir,
                readonly: false,
            });
            Rootfs {
                share_tag: IMAGE_SHARE_TAG.into(),
                path: ".".into(),
            }
        }
        None => Rootfs::embedded(husk_proto::DEFAULT_EMBEDDED_IMAGE),
    };
    let args: Vec<String> = if opts.args.is_empty() {
        DEFAULT_COMMAND.iter().map(|s| s.to_string()).collect()
    } else {
        opts.args.clone()
    };

    let mut sandbox = Sandbox::create(SandboxConfig {
        id: format!("run-{}-{}", std::process::id(), unique_suffix()),
        hostname: "husk".into(),
        vm: opts.vm,
        boot_timeout: opts.boot_timeout,
        own_netns: false,
        cgroups_path: None,
    })
    .await?;
    let spec = spec::default_spec(&args, &opts.env, false);
    sandbox
        .create_container(CONTAINER_ID, &spec, rootfs, opts.stdin)
        .await?;
    sandbox.start_container(CONTAINER_ID).await?;

    let agent = sandbox.agent().clone();
    let out = tokio::spawn(copy_output(agent.clone(), false, tokio::io::stdout()));
    let err = tokio::spawn(copy_output(agent.clone(), true, tokio::io::stderr()));
    let input = opts.stdin.then(|| tokio::spawn(forward_stdin(agent)));
    // No deadline: the command runs as long as it runs.
    let status = sandbox.wait_process(CONTAINER_ID, "").await?;
    for task in [out, err] {
        if let Ok(Err(e)) = task.await {
            tracing::warn!("output: {e}");
        }
    }
    if let Some(t) = input {
        t.abort();
    }
    if let Err(e) = sandbox.remove_container(CONTAINER_ID, 5000).await {
        tracing::warn!("{e}");
    }
    sandbox.shutdown().await?;
    Ok(status.exit_status)
}

/// Copies the container's stdout (or stderr) to `w` until EOF.
async fn copy_output(agent: Agent, stderr: bool, mut w: impl AsyncWrite + Unpin) -> Result<()> {
    loop {
        let (data, eof) = agent.read_output(CONTAINER_ID, "", stderr).await?;
        if !data.is_empty() {
            w.write_all(&data)
                .await
                .map_err(|e| SandboxError::io("write output", e))?;
            w.flush()
                .await
                .map_err(|e| SandboxError::io("write output", e))?;
        }
        if eof {
            return Ok(());
        }
    }
}

/// Sends our stdin to the process, then closes its stdin.
async fn forward_stdin(agent: Agent) -> Result<()> {
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = stdin
            .read(&mut buf)
            .await
            .map_err(|e| SandboxError::io("read stdin", e))?;
        if n == 0 {
            break;
        }
        agent.write_stdin(CONTAINER_ID, "", &buf[..n]).await?;
    }
    agent.close_stdin(CONTAINER_ID, "").await?;
    Ok(())
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{nanos:08x}")
}
