//! `husk`: the operator's CLI. `husk check` says whether this host can run microVMs.
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "husk", version, about = "husk: pod sandboxes in KVM microVMs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Report whether this host can run husk microVMs, and why not.
    Check,
}

fn main() -> std::process::ExitCode {
    match Cli::parse().cmd {
        Cmd::Check => match vmm::check::check_host() {
            Ok(()) => {
                println!("husk check: ok: /dev/kvm is usable with hardware virtualization; this host can run husk microVMs");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("husk check: {e}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}
