//! VMM start → the pod VM's agent ready, for this build and a peer build (another commit's
//! `husk-vmm` and guest image, e.g. the commit before a change), alternating in one run.
//!
//! Each boot is husk-vmm's command line as a benchmark can give it: kernel, the pod
//! initramfs (the agent as init), 256 MiB and one vCPU as a pod VM gets, hybrid vsock. The
//! host connects to the agent's port until the guest accepts (the agent listens: "listening"),
//! then asks `Health.Check` on that connection ("answered").
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::stage::Stage;
use husk_tests::bench::{median, ms};

/// The agent's ttrpc port (husk_proto::AGENT_VSOCK_PORT).
const AGENT_PORT: u32 = husk_proto::AGENT_VSOCK_PORT;
const POD_MEM_MIB: &str = "256";

/// One build to boot: its husk-vmm and its guest directory (vmlinux, husk-initramfs.cpio).
pub struct Build {
    pub name: String,
    pub bin_dir: PathBuf,
    pub guest_dir: PathBuf,
}

/// (VMM start → agent listening, VMM start → first answer).
fn boot_once(rt: &tokio::runtime::Runtime, b: &Build, run: usize) -> [Duration; 2] {
    let dir = std::env::temp_dir().join(format!("husk-bench-agent-{}-{run}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("v.sock");
    let mut c = Command::new(b.bin_dir.join("husk-vmm"));
    c.arg("--kernel").arg(b.guest_dir.join("vmlinux"));
    c.arg("--initramfs")
        .arg(b.guest_dir.join("husk-initramfs.cpio"));
    c.args([
        "--mem",
        POD_MEM_MIB,
        "--cmdline",
        "quiet",
        "--serial",
        "none",
    ]);
    c.arg("--vsock-uds").arg(&uds);
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    super::scrub::before_boot();
    let start = Instant::now();
    let mut child = c.spawn().expect("spawn husk-vmm");
    let times = rt.block_on(async {
        let stream = loop {
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "{}: the agent never listened",
                b.name
            );
            if let Ok(s) = husk_agent_client::connect_port(&uds, AGENT_PORT).await {
                break s;
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "{}: husk-vmm exited before its agent listened: {st}",
                    b.name
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let listening = start.elapsed();
        let client = ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::new(stream));
        husk_agent_client::Agent::from_client(client)
            .health
            .check(
                husk_agent_client::ctx(Duration::from_secs(30)),
                &husk_proto::agent::CheckRequest::new(),
            )
            .await
            .expect("Health.Check");
        [listening, start.elapsed()]
    });
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    times
}

fn check(b: &Build) {
    for f in [
        b.bin_dir.join("husk-vmm"),
        b.guest_dir.join("vmlinux"),
        b.guest_dir.join("husk-initramfs.cpio"),
    ] {
        assert!(f.exists(), "{}: {} is missing", b.name, f.display());
    }
}

/// Boots `this` and each peer alternately, `runs` times each, and prints the table.
pub fn table(this: Build, peer: Option<Build>, runs: usize) {
    husk_tests::require_kvm();
    let builds: Vec<Build> = std::iter::once(this).chain(peer).collect();
    builds.iter().for_each(check);
    // Each build boots from its own staged copy (see bench_vmm/stage.rs).
    let stages: Vec<Stage> = (builds.iter().enumerate())
        .map(|(i, b)| {
            let files = ["vmlinux", "husk-initramfs.cpio"];
            Stage::new(&format!("agent{i}"), &b.bin_dir, &b.guest_dir, &files)
        })
        .collect();
    let builds: Vec<Build> = (builds.into_iter().zip(&stages))
        .map(|(b, s)| Build {
            name: b.name,
            bin_dir: s.dir().to_owned(),
            guest_dir: s.dir().to_owned(),
        })
        .collect();
    // Per build: [listening, answered] samples in ms.
    let mut times: Vec<[Vec<f64>; 2]> = builds.iter().map(|_| [vec![], vec![]]).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for run in 0..runs {
        for (b, t) in builds.iter().zip(&mut times) {
            let [l, a] = boot_once(&rt, b, run).map(ms);
            eprintln!(
                "run {}/{runs} {}: listening {l:.0} ms, answered {a:.0} ms",
                run + 1,
                b.name
            );
            t[0].push(l);
            t[1].push(a);
        }
    }
    println!("VMM start → pod agent ready ({runs} alternating runs each, {POD_MEM_MIB} MiB, 1 vCPU; medians)");
    let names: Vec<&str> = builds.iter().map(|b| b.name.as_str()).collect();
    println!(
        "| measure | {} |{}",
        names.join(" | "),
        if builds.len() > 1 { " ratio |" } else { "" }
    );
    println!(
        "|---|{}",
        "---|".repeat(builds.len() + usize::from(builds.len() > 1))
    );
    for (label, i) in [
        ("VMM start → agent listening (ms)", 0),
        ("VMM start → first Health.Check answered (ms)", 1),
    ] {
        let v: Vec<f64> = times.iter().map(|t| median(t[i].clone())).collect();
        let cells: Vec<String> = v.iter().map(|m| format!("{m:.0}")).collect();
        let ratio = if v.len() > 1 {
            format!(" {:.2} |", v[0] / v[1])
        } else {
            String::new()
        };
        println!("| {label} | {} |{ratio}", cells.join(" | "));
    }
}

/// `--peer BIN_DIR GUEST_DIR`, if given.
pub fn peer_from_args() -> Option<Build> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == "--peer")?;
    let (bin, guest) = (args.get(i + 1), args.get(i + 2));
    let (Some(bin), Some(guest)) = (bin, guest) else {
        panic!("--peer BIN_DIR GUEST_DIR");
    };
    Some(Build {
        name: format!("peer ({})", Path::new(bin).display()),
        bin_dir: bin.into(),
        guest_dir: guest.into(),
    })
}
