//! huskctl: a small CRI client for trying huskd without crictl. `huskctl run` does what
//! kubelet does for a one-container pod (RunPodSandbox, CreateContainer, StartContainer,
//! waiting for the exit, StopPodSandbox, RemovePodSandbox) and prints the container's CRI
//! log as it was written.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use husk_cri::client::{connect, CriClient};
use husk_cri::image::builtin::BUILTIN_IMAGE;
use k8s_cri::v1 as cri;

#[derive(Parser)]
#[command(name = "huskctl", version, about = "a small CRI client of huskd")]
struct Args {
    /// huskd's CRI socket.
    #[arg(long, default_value = "/run/husk/huskd.sock")]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs CMD in a one-container pod, prints its log and exit code, removes the pod.
    Run {
        /// The container's image (pulled first unless it is the built-in one).
        #[arg(long, default_value = BUILTIN_IMAGE)]
        image: String,
        /// The pod's (and container's) name.
        #[arg(long, default_value = "huskctl")]
        name: String,
        /// The RuntimeClass handler.
        #[arg(long, default_value = "kata")]
        handler: String,
        /// How long the container may run.
        #[arg(long, default_value_t = 300)]
        timeout_secs: u64,
        /// The command; default: a greeting and `uname -a`.
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// Lists the images huskd has.
    Images,
    /// Lists the pods huskd has.
    Pods,
    /// The runtime's name and version.
    Version,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut c = connect(&args.socket);
    match args.command {
        Command::Run {
            image,
            name,
            handler,
            timeout_secs,
            cmd,
        } => {
            let code = run(&mut c, &image, &name, &handler, timeout_secs, cmd).await?;
            std::process::exit(code);
        }
        Command::Images => {
            let r = c.img.list_images(cri::ListImagesRequest::default()).await?;
            for i in r.into_inner().images {
                println!("{}  {}  {} B", i.id, i.repo_tags.join(","), i.size);
            }
        }
        Command::Pods => {
            let r = c.rt.list_pod_sandbox(cri::ListPodSandboxRequest::default());
            for p in r.await?.into_inner().items {
                let name = p.metadata.map(|m| m.name).unwrap_or_default();
                let state = cri::PodSandboxState::try_from(p.state)
                    .map(|s| s.as_str_name())
                    .unwrap_or("?");
                println!("{}  {name}  {state}  {}", p.id, p.runtime_handler);
            }
        }
        Command::Version => {
            let v = c.rt.version(cri::VersionRequest::default()).await?;
            let v = v.into_inner();
            println!(
                "{} {} (CRI {})",
                v.runtime_name, v.runtime_version, v.runtime_api_version
            );
        }
    }
    Ok(())
}

/// The pod's life; the container's exit code. The pod is removed however it ends.
async fn run(
    c: &mut CriClient,
    image: &str,
    name: &str,
    handler: &str,
    timeout_secs: u64,
    mut cmd: Vec<String>,
) -> anyhow::Result<i32> {
    if cmd.is_empty() {
        cmd = [
            "sh",
            "-c",
            "echo hello from a pod in a husk microVM; uname -a",
        ]
        .map(String::from)
        .to_vec();
    }
    let t0 = Instant::now();
    let lap = |what: &str| eprintln!("[{:>6.2} s] {what}", t0.elapsed().as_secs_f64());
    let logs = tempfile::Builder::new()
        .prefix("huskctl-logs-")
        .tempdir()
        .context("a log directory")?;
    if !image.starts_with("husk.local/") {
        let spec = cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        };
        c.img
            .pull_image(cri::PullImageRequest {
                image: Some(spec),
                ..Default::default()
            })
            .await
            .with_context(|| format!("PullImage {image}"))?;
        lap(&format!("pulled {image}"));
    }
    let sandbox = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("huskctl-{}", std::process::id()),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: logs.path().display().to_string(),
        ..Default::default()
    };
    let pod =
        c.rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sandbox.clone()),
            runtime_handler: handler.into(),
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;
    lap(&format!("pod {} ready (a microVM)", short(&pod)));
    let ran = run_container(c, &pod, sandbox, image, name, cmd, timeout_secs, &lap).await;
    let stopped =
        c.rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await;
    let removed =
        c.rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await;
    let code = ran?;
    stopped.context("StopPodSandbox")?;
    removed.context("RemovePodSandbox")?;
    lap("pod stopped and removed");
    let log = std::fs::read_to_string(logs.path().join(format!("{name}.log")))
        .context("read the container's CRI log")?;
    println!("--- {name}'s log (CRI format, as kubelet reads it) ---");
    print!("{log}");
    println!("--- exit code {code}");
    Ok(code)
}

#[allow(clippy::too_many_arguments)]
async fn run_container(
    c: &mut CriClient,
    pod: &str,
    sandbox: cri::PodSandboxConfig,
    image: &str,
    name: &str,
    cmd: Vec<String>,
    timeout_secs: u64,
    lap: &dyn Fn(&str),
) -> anyhow::Result<i32> {
    let config = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: cmd,
        log_path: format!("{name}.log"),
        ..Default::default()
    };
    let id =
        c.rt.create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(sandbox),
        })
        .await
        .context("CreateContainer")?
        .into_inner()
        .container_id;
    c.rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .context("StartContainer")?;
    lap(&format!("container {} started", short(&id)));
    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    loop {
        let st =
            c.rt.container_status(cri::ContainerStatusRequest {
                container_id: id.clone(),
                verbose: false,
            })
            .await
            .context("ContainerStatus")?
            .into_inner()
            .status
            .context("ContainerStatus without a status")?;
        if st.state == cri::ContainerState::ContainerExited as i32 {
            lap(&format!("container exited ({})", st.reason));
            return Ok(st.exit_code);
        }
        if Instant::now() > deadline {
            bail!("the container still runs after {timeout_secs} s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An id as crictl shows it: its first 12 characters.
fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}
