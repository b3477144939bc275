//! `husk-agent`: serves the agent API. As PID 1 (in the guest) it first sets up the system
//! and listens on vsock port 1024; elsewhere it is a host-mode agent on the given socket.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use husk_agent::{init, Agent, Config, Mode, Server};

#[derive(Parser, Debug)]
#[command(name = "husk-agent", version, about = "husk's in-guest agent")]
struct Args {
    /// Where to serve: unix:///path or vsock://-1:<port>. Default: vsock://-1:1024 as PID 1.
    #[arg(long)]
    listen: Option<String>,
    /// Where to serve port-forward streams: unix:///path or vsock://-1:<port>. Default:
    /// vsock://-1:1025 as the guest agent with the default --listen; none otherwise.
    #[arg(long)]
    port_forward_listen: Option<String>,
    /// Run as the guest agent (PID 1 duties) or on a host. Default: guest when PID 1.
    #[arg(long, value_parser = ["guest", "host"])]
    mode: Option<String>,
    /// State directory (libcontainer state, bundles, sandbox files).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Directory whose subdirectories, named by tag, are the shares.
    #[arg(long)]
    share_root: Option<PathBuf>,
    /// Do not write husk-vmm's boot marker (I/O port 0x3f0) once ready in guest mode: for
    /// guest-mode runs outside a VM, where the port is not ours.
    #[arg(long)]
    no_boot_marker: bool,
    /// Set containers up with MS_MOVE + chroot instead of pivot_root. Automatic when `/` is
    /// the initramfs (where pivot_root is impossible).
    #[arg(long)]
    no_pivot: bool,
}

fn main() -> anyhow::Result<()> {
    // The runtime helper: `husk-agent __runtime <workdir>` (see husk_agent::helper).
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("__runtime") {
        let dir = argv.get(2).context("__runtime needs a work directory")?;
        std::process::exit(husk_agent::helper::main(std::path::Path::new(dir)));
    }

    let args = Args::parse();
    let pid1 = std::process::id() == 1;
    let mode = match args.mode.as_deref() {
        Some("guest") => Mode::Guest,
        Some("host") => Mode::Host,
        _ if pid1 => Mode::Guest,
        _ => Mode::Host,
    };
    if mode == Mode::Guest {
        husk_agent::boot_timeline::mark_init();
        // Before logging: /dev (the console) may not be mounted yet.
        init::mount_pseudo_filesystems().context("PID 1 set-up")?;
        init::ensure_console();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUSK_AGENT_LOG")
                // libcgroups warns about every v1 controller a host lacks, on every call.
                .unwrap_or_else(|_| "info,libcgroups=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();

    let listen = match (&args.listen, mode) {
        (Some(l), _) => l.clone(),
        (None, Mode::Guest) => format!("vsock://-1:{}", husk_proto::AGENT_VSOCK_PORT),
        (None, Mode::Host) => anyhow::bail!("host mode needs --listen unix:///path"),
    };
    let port_forward_listen = match (&args.port_forward_listen, &args.listen, mode) {
        (Some(l), _, _) => Some(l.clone()),
        (None, None, Mode::Guest) => Some(format!(
            "vsock://-1:{}",
            husk_proto::AGENT_PORT_FORWARD_VSOCK_PORT
        )),
        _ => None,
    };
    let no_boot_marker = args.no_boot_marker;
    let force_no_pivot = args.no_pivot;
    let mut cfg = Config::new(mode);
    if let Some(d) = args.state_dir {
        cfg.state_dir = d;
    }
    if let Some(d) = args.share_root {
        cfg.share_root = d;
    }
    if mode == Mode::Host {
        init::become_subreaper().context("PR_SET_CHILD_SUBREAPER")?;
    }
    if mode == Mode::Guest {
        if let Err(e) = init::mount_embedded_images(&cfg.share_root) {
            tracing::warn!("embedded images: {e}");
        }
    }
    cfg.no_pivot = force_no_pivot || init::root_is_initramfs();
    if cfg.no_pivot {
        tracing::info!("root is the initramfs: containers use MS_MOVE + chroot, not pivot_root");
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let result: anyhow::Result<()> = rt.block_on(async {
        let agent = Agent::new(cfg.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let server = Server::start(agent.clone(), &listen).await?;
        // Before the boot marker: a pod is ready only once port-forward is served too.
        let port_forward = match &port_forward_listen {
            Some(addr) => {
                let l = husk_agent::port_forward::Listener::bind(addr)?;
                tracing::info!(%addr, "port-forward served");
                Some(tokio::spawn(husk_agent::port_forward::serve(
                    l,
                    agent.clone(),
                )))
            }
            None => None,
        };
        if mode == Mode::Guest {
            husk_agent::boot_timeline::mark_serving();
        }
        tracing::info!(?mode, state = %cfg.state_dir.display(), "husk-agent ready");
        if mode == Mode::Guest {
            // Containers share the guest's network namespace; its loopback starts down.
            match agent.net().await {
                Ok(net) => {
                    if let Err(e) = net.link_up("lo").await {
                        tracing::warn!("bring lo up: {e}");
                    }
                }
                Err(e) => tracing::warn!("netlink: {e}"),
            }
        }
        if mode == Mode::Guest && !no_boot_marker {
            if let Err(e) = init::write_boot_marker() {
                tracing::warn!("boot marker: {e}");
            }
        }
        wait_for_shutdown(pid1).await;
        tracing::info!("shutting down");
        let _ = agent.destroy_sandbox(2000).await;
        if let Some(t) = port_forward {
            t.abort();
        }
        server.shutdown().await;
        Ok(())
    });
    if pid1 {
        // PID 1 must never exit (the kernel panics); power off instead.
        if let Err(e) = &result {
            tracing::error!("{e:#}");
        }
        nix::unistd::sync();
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    }
    result
}

/// Host mode: until SIGTERM or SIGINT. As PID 1: until SIGTERM (the VMM shuts us down).
async fn wait_for_shutdown(_pid1: bool) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
