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
//! Each figure is the median of `--runs` (default 20); the table shows ratios to the peer.
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_agent_client::{Agent, Rootfs};
use husk_shim::spec::default_spec;
use husk_tests::pod;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

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
    let rt = pod::runtime();
    let spec = pod::spec();
    let pid = std::process::id();

    let mut boots = Vec::new();
    let mut starts = Vec::new();
    rt.block_on(async {
        for i in 0..runs {
            let (sandbox, took) = pod::boot(&format!("bench-boot-{pid}-{i}"), "bench", &spec).await;
            boots.push(ms(took));
            eprintln!("boot {i}: {:.0} ms", ms(took));
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

    let (b, s, r) = (median(boots), median(starts), median(runc));
    println!("husk-bench-agent: medians of {runs} runs");
    println!("| measure | husk | peer | ratio |");
    println!("|---|---|---|---|");
    println!("| VM launch → agent Health.Check + CreateSandbox | {b:.0} ms | (no peer) | |");
    println!(
        "| create+start+stdout of /bin/true, warm VM vs `runc run` | {s:.1} ms | {r:.1} ms (runc) | {:.2} |",
        s / r
    );
}
