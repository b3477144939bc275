//! Host-mode start latency: CreateContainer + StartContainer + first stdout byte through the
//! agent, against `runc run` of the same bundle. Not a regular test (timing varies with load):
//! `cargo test -p husk-agent --release --test bench -- --ignored --nocapture` as root.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use husk_proto::agent as pb;

const RUNS: usize = 20;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test]
#[ignore = "benchmark: run explicitly"]
async fn container_start_latency_vs_runc() {
    assert!(can_run());
    assert!(
        Command::new("runc").arg("--version").output().is_ok(),
        "the benchmark compares against runc: run scripts/setup"
    );
    let a = TestAgent::start("bench").await;
    a.create_sandbox("bench", false).await;
    let s = spec(&["echo", "x"]);

    let mut agent_times = Vec::new();
    for i in 0..RUNS {
        let id = format!("b{i}");
        let t0 = Instant::now();
        a.run(&id, &s).await;
        let mut req = pb::ReadStreamRequest::new();
        req.container_id = id.clone();
        let first = a.io.read_stdout(ctx(), &req).await.unwrap();
        agent_times.push(t0.elapsed());
        assert_eq!(first.data, b"x\n");
        a.wait(&id, "").await;
        a.remove(&id).await;
    }

    // The same spec as a runc bundle (runc makes its own network namespace).
    let bundle = a.dir.path().join("runc-bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let mut rs = s.clone();
    rs["root"]["path"] = a.share_dir().join("rootfs").to_str().unwrap().into();
    std::fs::write(bundle.join("config.json"), serde_json::to_vec(&rs).unwrap()).unwrap();
    let root = a.dir.path().join("runc-root");
    let mut runc_times = Vec::new();
    for i in 0..RUNS {
        let t0 = Instant::now();
        let mut child = Command::new("runc")
            .arg("--root")
            .arg(&root)
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(format!("r{i}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut b = [0u8; 1];
        child.stdout.as_mut().unwrap().read_exact(&mut b).unwrap();
        runc_times.push(t0.elapsed());
        child.wait().unwrap();
    }

    let (am, rm) = (median(agent_times), median(runc_times));
    println!("\n| median of {RUNS} runs                          | time      |");
    println!("|---------------------------------------------|-----------|");
    println!(
        "| husk-agent: create + start + first byte     | {:>6.1} ms |",
        am.as_secs_f64() * 1e3
    );
    println!(
        "| runc run: first byte                        | {:>6.1} ms |",
        rm.as_secs_f64() * 1e3
    );
    println!(
        "| ratio husk-agent / runc                     | {:>6.2}    |",
        am.as_secs_f64() / rm.as_secs_f64()
    );
    a.shutdown().await;
}
