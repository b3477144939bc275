//! huskd: serves CRI v1 on a Unix socket until SIGTERM or SIGINT.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use husk_cri::config::Config;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(
    name = "huskd",
    version,
    about = "husk's CRI v1 server for kubelet and crictl"
)]
struct Args {
    /// husk.toml to read the `[huskd]` section from (default /etc/husk/husk.toml; a missing
    /// default file means all defaults).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUSK_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    raise_nofile_limit();
    let config = Config::load(args.config.as_deref()).context("huskd config")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("huskd stopping");
    };
    // The shim reads the same file (a default path that does not exist: defaults there too).
    let path = args
        .config
        .clone()
        .or_else(|| Some(PathBuf::from(husk_cri::config::DEFAULT_PATH)).filter(|p| p.exists()));
    husk_cri::server::serve(config, path, shutdown)
        .await
        .context("huskd")?;
    Ok(())
}

/// Lifts the soft descriptor limit to the hard one, as containerd does: each pod holds FIFOs
/// and shim connections, and the streaming server a socket per client.
fn raise_nofile_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, initialized rlimit.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r) == 0
        }
    };
    if !raised {
        tracing::warn!(error = %std::io::Error::last_os_error(), "raise RLIMIT_NOFILE");
    }
}
