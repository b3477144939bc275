//! husk-bench-agent: the pod VM's agent, timed. Run it where KVM works (inside the lab:
//! `tests/lab/run -- target/release/husk-bench-agent`).
//!
//! - boot → sandbox: from launching the VM (virtiofsd-less pod VM, husk-vmm spawned and
//!   configured through its API) to the agent answering `Health.Check` over hybrid vsock
//!   and `CreateSandbox` done (what `Sandbox::create` returns after).
//! - container start, warm VM: `CreateContainer` + `StartContainer` + the end of `/bin/true`'s
//!   stdout (its first and only answer: EOF) in a VM that already runs, on the embedded
//!   busybox image. Peer: `runc run` of the same busybox bundle with the same spec on this
//!   host, from spawn to exit.
//!
//! - boot phases: where the boot went, from husk-vmm's log (process start to its first
//!   KVM_RUN) and the agent's own boot timeline (`Version`: when, on the guest's clock, it
//!   started as init and began serving); the rest is the host's side (launch, API, vsock).
//!
//! Each figure is the median of `--runs` (default 20); the table shows ratios to the peer.
use husk_tests::bench::{median, ms};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_agent_client::{Agent, Rootfs};
use husk_shim::spec::default_spec;
use husk_tests::pod;

async fn container_start(agent: &Agent, id: &str) -> Duration {
    let spec = default_spec(&["/bin/true".into()], &[], false);
    let rootfs = Rootfs::embedded(husk_proto::DEFAULT_EMBEDDED_IMAGE);
    let t = Instant::now();
    agent
        .create_container(id, &spec, &rootfs, false)
        .await
        .expect("CreateContainer");
    agent.start_container(id).await.expect("StartContainer");
    loop {
        let (data, eof) = agent.read_output(id, "", false).await.expect("ReadStdout");
        if eof || !data.is_empty() {
            break;
        }
    }
    let took = t.elapsed();
    let w = agent.wait_process(id, "").await.expect("WaitProcess");
    assert_eq!(w.exit_status, 0, "/bin/true failed in the VM");
    agent
        .remove_container(id, 5000)
        .await
        .expect("RemoveContainer");
    took
}

/// A runc bundle: the busybox rootfs and the spec husk uses, with its root path made
/// absolute for runc.
fn runc_bundle(dir: &Path) {
    let rootfs = dir.join("rootfs");
    husk_tests::busybox_rootfs(&rootfs, &["true"]);
    let mut spec = default_spec(&["/bin/true".into()], &[], false);
    spec["root"]["path"] = rootfs.to_string_lossy().into_owned().into();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&spec).unwrap(),
    )
    .unwrap();
}

fn runc_run(bundle: &Path, id: &str) -> Duration {
    let t = Instant::now();
    let st = Command::new("runc")
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .expect("runc (Debian package runc)");
    let took = t.elapsed();
    assert!(st.success(), "runc run failed: {st}");
    took
}

/// One boot's phases in ms: (VMM start → first KVM_RUN, kernel → init, init → serving).
async fn boot_phases(sandbox: &husk_shim::sandbox::Sandbox) -> (f64, f64, f64) {
    let log = std::fs::read_to_string(sandbox.dir().join("vmm.log")).unwrap_or_default();
    let first_run = log
        .lines()
        .find_map(|l| l.split_once("first KVM_RUN ").map(|(_, r)| r.to_string()))
        .and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no first KVM_RUN line in vmm.log (HUSK_LOG=info?):\n{log}"));
    let v = sandbox
        .agent()
        .health
        .version(
            husk_agent_client::ctx(Duration::from_secs(10)),
            &husk_proto::agent::CheckRequest::new(),
        )
        .await
        .expect("agent Version");
    assert!(v.boot_init_ms > 0, "the agent reported no boot timeline");
    (
        first_run,
        v.boot_init_ms as f64,
        v.boot_serving_ms.saturating_sub(v.boot_init_ms) as f64,
    )
}

fn main() {
    let mut runs = 20usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            _ => {
                eprintln!("usage: husk-bench-agent [--runs N]");
                std::process::exit(2);
            }
        }
    }
    husk_tests::require_kvm();
    // The VMM's start-up lines are at info level.
    std::env::set_var("HUSK_LOG", "info");
    let rt = pod::runtime();
    let spec = pod::spec();
    let pid = std::process::id();

    let mut boots = Vec::new();
    let mut phases = (Vec::new(), Vec::new(), Vec::new());
    let mut starts = Vec::new();
    rt.block_on(async {
        for i in 0..runs {
            let (sandbox, took) = pod::boot(&format!("bench-boot-{pid}-{i}"), "bench", &spec).await;
            boots.push(ms(took));
            let (vmm, kernel, agent) = boot_phases(&sandbox).await;
            phases.0.push(vmm);
            phases.1.push(kernel);
            phases.2.push(agent);
            eprintln!(
                "boot {i}: {:.0} ms (VMM {vmm:.0}, kernel {kernel:.0}, agent {agent:.0})",
                ms(took)
            );
            sandbox.shutdown().await.unwrap();
        }
        let (sandbox, _) = pod::boot(&format!("bench-warm-{pid}"), "bench", &spec).await;
        let agent = sandbox.agent().clone();
        // One unmeasured round: first-use costs (page cache, libcontainer state dir).
        container_start(&agent, "warmup").await;
        for i in 0..runs {
            let took = container_start(&agent, &format!("c{i}")).await;
            starts.push(ms(took));
        }
        drop(agent);
        sandbox.shutdown().await.unwrap();
    });

    let dir = std::env::temp_dir().join(format!("husk-bench-runc-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    runc_bundle(&dir);
    runc_run(&dir, &format!("husk-bench-warmup-{pid}"));
    let runc: Vec<f64> = (0..runs)
        .map(|i| ms(runc_run(&dir, &format!("husk-bench-{pid}-{i}"))))
        .collect();
    let _ = std::fs::remove_dir_all(&dir);

    let (vmm, kernel, agent) = (median(phases.0), median(phases.1), median(phases.2));
    let (b, s, r) = (median(boots), median(starts), median(runc));
    println!("husk-bench-agent: medians of {runs} runs");
    println!("| measure | husk | peer | ratio |");
    println!("|---|---|---|---|");
    println!("| VM launch → agent Health.Check + CreateSandbox | {b:.0} ms | (no peer) | |");
    println!(
        "| create+start+stdout of /bin/true, warm VM vs `runc run` | {s:.1} ms | {r:.1} ms (runc) | {:.2} |",
        s / r
    );
    println!();
    println!("boot phases (medians of {runs}; host and guest clocks, so they add up only roughly)");
    println!("| phase | ms |");
    println!("|---|---|");
    println!("| VMM process start → first KVM_RUN (VMM log) | {vmm:.1} |");
    println!("| kernel start → agent as init (guest CLOCK_BOOTTIME) | {kernel:.0} |");
    println!("| agent start → serving on vsock (guest clock) | {agent:.0} |");
    println!(
        "| the rest: launch, control API, vsock connect, first answer, CreateSandbox | {:.0} |",
        b - vmm - kernel - agent
    );
}
