//! `husk`: the operator's CLI.
//! - `husk check` says whether this host can run microVMs, and why not (`--node`: also
//!   what a Kubernetes node needs).
//! - `husk run` runs one command in a container in a fresh microVM.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use husk_shim::run::{self, RunOptions};
use husk_shim::SandboxError;

#[derive(Parser)]
#[command(name = "husk", version, about = "husk: pod sandboxes in KVM microVMs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Report whether this host can run husk microVMs, and why not.
    Check(CheckArgs),
    /// Run a command in a container in a fresh microVM, stream its output, exit with its
    /// status. Default: the embedded busybox image and
    /// `sh -c 'echo hello from a husk microVM; uname -a'`.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct CheckArgs {
    /// Also check what a Kubernetes node needs: overlay and br_netfilter loaded, the
    /// bridge-nf-call-iptables and ip_forward sysctls at 1, a CNI config, huskd answering.
    #[arg(long)]
    node: bool,
    /// Where the node's CNI configs are.
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// huskd's CRI socket.
    #[arg(long, default_value = "/run/husk/huskd.sock")]
    huskd_socket: PathBuf,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Root filesystem directory for the container (shared with the VM over virtio-fs).
    /// Default: the busybox image embedded in the guest.
    #[arg(long, value_name = "DIR")]
    image: Option<PathBuf>,
    /// Extra environment for the command (repeatable).
    #[arg(short, long, value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Forward stdin to the command.
    #[arg(short, long)]
    interactive: bool,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u32,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest kernel (default: vmlinux in the guest image directory).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest initramfs with the agent (default: husk-initramfs.cpio there).
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Show the guest's console on stderr.
    #[arg(long)]
    console: bool,
    /// Seconds the guest gets to boot and answer.
    #[arg(long, default_value_t = 120)]
    boot_timeout: u64,
    /// The command and its arguments (after `--`).
    #[arg(last = true, value_name = "CMD")]
    cmd: Vec<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUSK_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Check(args) => {
            let kvm = husk_vmm_api::check::check_host();
            match &kvm {
                Ok(()) => println!("husk check: ok: /dev/kvm is usable with hardware virtualization; this host can run husk microVMs"),
                Err(e) => eprintln!("husk check: {e}"),
            }
            // Reported either way: a host without KVM may still be one where the jail is not.
            let jail = husk_vmm_api::jail_check::check_jail();
            match &jail {
                Ok(()) => println!("husk check: ok: VMMs can be jailed here (root; new mount, PID, IPC and UTS namespaces)"),
                Err(e) => eprintln!("husk check: jail: {e}"),
            }
            let mut node_ok = true;
            if args.node {
                let paths = husk_shim::node_check::NodePaths {
                    cni_conf_dir: args.cni_conf_dir,
                    huskd_socket: args.huskd_socket,
                    ..Default::default()
                };
                for f in husk_shim::node_check::check_node(&paths) {
                    match f.problem {
                        None => println!("husk check: ok: node: {}", f.what),
                        Some(p) => {
                            node_ok = false;
                            eprintln!("husk check: node: {}: {p}", f.what);
                        }
                    }
                }
            }
            if kvm.is_ok() && jail.is_ok() && node_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Cmd::Run(args) => match run_cmd(args) {
            Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
            Err(e) => {
                eprintln!("husk run: {e:#}");
                ExitCode::from(125)
            }
        },
    }
}

/// Exit statuses of `husk run` itself (the command's own status otherwise), as `docker run`
/// has them: 125 when husk failed, 130/143 when interrupted.
fn run_cmd(args: RunArgs) -> anyhow::Result<i32> {
    // Refuse before anything else, with husk check's explanation.
    if let Err(e) = husk_vmm_api::check::check_host() {
        return Err(SandboxError::NoKvm(e.to_string()).into());
    }
    let mut opts = RunOptions::new()?;
    opts.image = args.image;
    opts.args = args.cmd;
    opts.env = args.env;
    opts.stdin = args.interactive;
    opts.vm.mem_mib = args.mem;
    opts.vm.vcpus = args.vcpus;
    opts.vm.console_to_stderr = args.console;
    if let Some(k) = args.kernel {
        opts.vm.kernel = k;
    }
    if let Some(i) = args.initramfs {
        opts.vm.initramfs = i;
    }
    opts.boot_timeout = Duration::from_secs(args.boot_timeout);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        // Dropping the run future drops its VM, which kills the VMM and cleans up.
        tokio::select! {
            r = run::run(opts) => Ok(r?),
            _ = int.recv() => Ok(130),
            _ = term.recv() => Ok(143),
        }
    })
}
