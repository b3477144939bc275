//! husk-vmm: boots one microVM and runs it until the guest ends.
//!
//! Exit status ([`VmmExitStatus`]): 0 the guest shut down or rebooted (or the API stopped
//! it), 1 the VM could not be set up, 2 usage error, 3 the guest kernel panicked, 4 a vCPU
//! failed.
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use event_manager::{EventManager, SubscriberOps};
use vmm::api::{
    ApiHandler, ApiServer, BlockConfig, FsConfig, MachineConfig, NetConfig, Request, SerialConfig,
    VmmExitStatus, VsockConfig,
};
use vmm::builder::Subscriber;
use vmm::controller::{Controller, JailSpec, Options};
use vmm::vstate::ExitReason;

#[derive(Parser, Debug)]
#[command(name = "husk-vmm", version, about = "husk's KVM microVM monitor")]
struct Args {
    /// Uncompressed ELF vmlinux with a PVH entry point. With it, the VM boots at once;
    /// without it, --api-sock is required and the VM is configured over the API.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs (newc cpio, uncompressed is fastest).
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Appended to the built-in command line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem: u32,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Hybrid vsock: host Unix socket (host connects with "CONNECT <port>\n"; guest
    /// connections to host port P go to "<path>_P").
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// Guest CID for vsock.
    #[arg(long, default_value_t = 3)]
    vsock_cid: u64,
    /// A raw disk image: PATH[,ro][,id=SERIAL] (SERIAL: the disk's serial in the guest,
    /// at most 20 bytes). Repeatable.
    #[arg(long)]
    block: Vec<BlockConfig>,
    /// A tap device by name: NAME or NAME,mac=aa:bb:cc:dd:ee:ff. Repeatable.
    #[arg(long)]
    net_tap: Vec<NetConfig>,
    /// virtio-fs through vhost-user: SOCKET,tag=TAG. Repeatable.
    #[arg(long)]
    fs_socket: Vec<FsConfig>,
    /// Guest console: stdout, none, or a file path.
    #[arg(long, default_value = "stdout")]
    serial: SerialConfig,
    /// Control API socket (newline-delimited JSON; see the `api` module docs).
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Jail the VMM (needs root): from process start in a PID namespace of its own, and once
    /// everything is open, in new mount, IPC and UTS namespaces with DIR as `/`, under
    /// resource limits, as --uid/--gid. Sockets guest connections reach must be inside DIR.
    #[arg(long, requires_all = ["uid", "gid"])]
    jail: Option<PathBuf>,
    #[arg(long)]
    uid: Option<u32>,
    #[arg(long)]
    gid: Option<u32>,
    /// With --jail: most files the VMM may hold open (RLIMIT_NOFILE).
    #[arg(long, default_value_t = vmm::jail::ResourceLimits::default().nofile)]
    rlimit_nofile: u64,
    /// With --jail: largest file offset the VMM may write at, in bytes (RLIMIT_FSIZE); raised
    /// to the size of the largest writable disk.
    #[arg(long, default_value_t = vmm::jail::ResourceLimits::default().fsize)]
    rlimit_fsize: u64,
    /// Test hook (with --jail): report what the jailed VMM sees, PATH being one that must not
    /// exist inside, then make a forbidden call, which must kill the VMM.
    #[arg(long, hide = true, requires = "jail")]
    jail_selftest: Option<PathBuf>,
    /// Run without the seccomp filters (debugging only). HUSK_SECCOMP=log logs instead.
    #[arg(long)]
    no_seccomp: bool,
}

/// The command line as the API requests it stands for: both paths configure the VM through
/// the same [`Controller::handle`].
fn requests_from_args(a: Args, kernel: PathBuf) -> Vec<Request> {
    let mut reqs = vec![Request::Configure(MachineConfig {
        kernel,
        initramfs: a.initramfs,
        cmdline: Some(a.cmdline),
        mem_mib: a.mem,
        vcpus: a.vcpus,
        serial: a.serial,
    })];
    reqs.extend(a.block.into_iter().map(Request::AddBlock));
    reqs.extend(a.net_tap.into_iter().map(Request::AddNet));
    reqs.extend(a.fs_socket.into_iter().map(Request::AddFs));
    reqs.extend(a.vsock_uds.map(|uds_path| {
        Request::AddVsock(VsockConfig {
            guest_cid: a.vsock_cid,
            uds_path,
        })
    }));
    reqs
}

fn run(args: Args, start: Instant) -> anyhow::Result<VmmExitStatus> {
    let jail = match (&args.jail, args.uid, args.gid) {
        (Some(dir), Some(uid), Some(gid)) => Some(JailSpec {
            dir: dir.clone(),
            uid,
            gid,
            limits: vmm::jail::ResourceLimits {
                nofile: args.rlimit_nofile,
                fsize: args.rlimit_fsize,
            },
        }),
        _ => None,
    };
    let api_sock = args.api_sock.clone();
    let opts = Options {
        seccomp: !args.no_seccomp,
        jail_selftest: args.jail_selftest.clone(),
    };
    let mut em = EventManager::<Subscriber>::new()
        .map_err(|e| anyhow::anyhow!("cannot create the event loop: {e:?}"))?;
    let ctl = Arc::new(Mutex::new(
        Controller::new(opts, jail).context("cannot start the cleanup helper")?,
    ));
    if let Some(p) = &api_sock {
        let server = ApiServer::bind(p, ctl.clone()).context("cannot serve the control API")?;
        lock(&ctl)
            .remove_at_exit(std::slice::from_ref(p))
            .context("cannot watch the API socket")?;
        em.add_subscriber(Arc::new(Mutex::new(server)));
    }
    match args.kernel.clone() {
        Some(kernel) => {
            let mut c = lock(&ctl);
            for req in requests_from_args(args, kernel) {
                let op = req.op();
                let checked = req.validate(0).map(|()| c.handle(req, Vec::new()));
                match checked {
                    Ok(resp) if resp.ok => {}
                    Ok(resp) => bail!("{op}: {}", resp.error.unwrap_or_default()),
                    Err(e) => bail!("{e}"),
                }
            }
            c.start(start).map_err(|e| anyhow::anyhow!(e))?;
        }
        None if api_sock.is_none() => {
            bail!("give --kernel to boot at once, or --api-sock to be configured over the API")
        }
        None => tracing::info!("waiting for configuration on the control API"),
    }
    let reason = loop {
        for s in lock(&ctl).take_pending() {
            em.add_subscriber(s);
        }
        if let Some(r) = lock(&ctl).finished() {
            break r;
        }
        em.run()
            .map_err(|e| anyhow::anyhow!("event loop failed: {e:?}"))?;
    };
    match &reason {
        ExitReason::VcpuError(msg) => tracing::error!("VM ended: vCPU error: {msg}"),
        ExitReason::GuestPanic => tracing::error!("VM ended: the guest kernel panicked"),
        r => tracing::info!("VM ended: {}", r.name()),
    }
    // The cleanup helper removes the socket files: the VMM's own filter has no unlink.
    lock(&ctl).finish_cleanup();
    Ok(reason.exit_status())
}

fn lock(c: &Mutex<Controller>) -> std::sync::MutexGuard<'_, Controller> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// A core dump of the VMM would hold the guest's secrets and fill the host's disk with its
/// RAM; guest memory is MADV_DONTDUMP too, this covers everything else.
fn forbid_core_dumps() -> std::io::Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn main() -> ExitCode {
    let start = Instant::now();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUSK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    if let Err(e) = forbid_core_dumps() {
        tracing::error!("cannot set RLIMIT_CORE to 0: {e}");
        std::process::exit(VmmExitStatus::SetupFailed.code().unwrap_or(1));
    }
    let status = match run(args, start) {
        Ok(status) => status,
        Err(e) => {
            tracing::error!("{e:#}");
            VmmExitStatus::SetupFailed
        }
    };
    let code = status.code().unwrap_or(1);
    let _ = std::io::stdout().flush();
    // vCPU threads may still sit in KVM_RUN; ending the process ends them.
    std::process::exit(code)
}
