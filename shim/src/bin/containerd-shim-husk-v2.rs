//! containerd-shim-husk-v2: the containerd shim v2 of husk (`io.containerd.husk.v2`). One
//! shim per pod sandbox; the pod runs in a microVM.
//!
//! containerd runs it as `... -namespace NS -address A -publish-binary P -id ID start`
//! (prints the pod shim's address), `... -bundle B delete` (cleans up a dead shim, prints a
//! DeleteResponse); `start` spawns the server itself with the private `serve` action.

use anyhow::Context;
use husk_shim::containerd::{bootstrap, vm_runtime::VmRuntime};

fn init_logging(debug: bool) {
    // stderr is containerd's shim log FIFO in the server, and discarded by `start`/`delete`
    // callers unless they fail. containerd-shim logs with `log`; tracing-subscriber bridges it.
    let level = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HUSK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

fn main() -> anyhow::Result<()> {
    let args: Vec<_> = std::env::args_os().collect();
    let flags = containerd_shim::parse(&args[1..]).context("parse the shim flags")?;
    if flags.version {
        println!("containerd-shim-husk-v2 {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    match flags.action.as_str() {
        "start" => {
            // No logging set up: containerd reads start's stdout AND stderr as the address.
            let stdin = bootstrap::read_stdin();
            let address = bootstrap::start(&flags, &stdin).context("start")?;
            print!("{address}");
            Ok(())
        }
        "delete" => {
            init_logging(flags.debug);
            let r = bootstrap::delete(&flags).context("delete")?;
            bootstrap::print_delete_response(&r).context("delete")?;
            Ok(())
        }
        bootstrap::SERVE_ACTION => {
            init_logging(flags.debug);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("tokio runtime")?;
            rt.block_on(bootstrap::serve(&flags, VmRuntime::new()))
                .context("serve")?;
            Ok(())
        }
        other => anyhow::bail!("unknown action {other:?} (containerd runs start and delete)"),
    }
}
