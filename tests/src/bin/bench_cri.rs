//! husk-bench-cri: busybox pods through huskd, through containerd with husk's shim, and
//! through containerd with runc, in one run, on the same image (the test busybox: imported
//! into containerd, pulled by huskd from a local registry). Run it where KVM works (in the
//! lab: `tests/lab/run --mem 8192 -- target/release/husk-bench-cri`).
//!
//! - pod start: RunPodSandbox → CreateContainer + StartContainer (`echo up; sleep`) → the
//!   line `up` in the container's CRI log; the three alternate (which goes first rotates);
//!   median of `--runs` (10) each.
//! - pods per minute, 4 in parallel: `--burst` (8) pods, started by 4 workers, each up to
//!   its first log line; pods over the time until the last is up (removal not counted).
//! - the CRI server's own RSS (`VmRSS`) with `--pods` (10) idle pods: huskd's with its
//!   pods; containerd's with husk pods and with runc pods (its shims not counted: huskd's
//!   shims are not counted either).
use std::path::PathBuf;
use std::time::{Duration, Instant};

use husk_tests::bench::{arg, median};
use husk_tests::containerd::cri::{wait_log_line, Cri};
use husk_tests::containerd::{images, Containerd, HANDLER_HUSK, HANDLER_RUNC};
use husk_tests::huskd::{Huskd, Registry};

/// One way of running a pod: a CRI endpoint and the handler to ask it for.
#[derive(Clone)]
struct Target {
    name: &'static str,
    cri: Cri,
    handler: &'static str,
    log_root: PathBuf,
    cgroup_parent: String,
    image: String,
}

/// Runs a busybox pod up to its first log line; the pod id and the time it took.
async fn start_pod(t: &Target, pod_name: &str) -> (String, Duration) {
    let mut cri = t.cri.clone();
    let t0 = Instant::now();
    let pod = cri
        .run_pod(pod_name, t.handler, &t.log_root, &t.cgroup_parent)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", t.name));
    cri.run_container(
        &pod,
        "c",
        &t.image,
        &["sh", "-c", "echo up; exec sleep 3600"],
    )
    .await
    .unwrap_or_else(|e| panic!("{}: {e}", t.name));
    wait_log_line(
        &pod.log_dir().join("c.log"),
        Duration::from_secs(300),
        |l| l.text == "up",
    )
    .await;
    (pod.id, t0.elapsed())
}

async fn remove(t: &Target, ids: Vec<String>) {
    let mut cri = t.cri.clone();
    for id in ids {
        cri.stop_remove_pod(&id)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", t.name));
    }
}

/// `burst` pods started by 4 workers; pods per minute until the last is up.
async fn pods_per_minute(t: &Target, burst: usize) -> f64 {
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for w in 0..4 {
        let t = t.clone();
        workers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in (w..burst).step_by(4) {
                ids.push(start_pod(&t, &format!("burst-{}-{i}", t.handler)).await.0);
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for w in workers {
        ids.extend(w.await.expect("a burst worker"));
    }
    let rate = burst as f64 / t0.elapsed().as_secs_f64() * 60.0;
    remove(t, ids).await;
    rate
}

/// `VmRSS` of a process in MiB (0 if it is gone).
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// The pid of the (only) containerd.
fn containerd_pid() -> u32 {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "containerd")
        })
        .expect("a containerd process")
}

/// The server's RSS with `pods` idle pods of `t`.
async fn rss_with_pods(t: &Target, pods: usize, pid: u32) -> f64 {
    let mut ids = Vec::new();
    for p in 0..pods {
        ids.push(start_pod(t, &format!("idle-{}-{p}", t.handler)).await.0);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = rss_mib(pid);
    eprintln!("{}: {pods} pods, server RSS {rss:.1} MiB", t.name);
    remove(t, ids).await;
    rss
}

fn main() {
    let runs = arg("--runs", 10);
    let burst = arg("--burst", 8);
    let pods = arg("--pods", 10);
    if std::env::var_os("HUSK_BIN_DIR").is_none() {
        // huskd, the shim, husk-vmm and pause next to this binary (target/release).
        let dir = std::env::current_exe().expect("current exe");
        std::env::set_var("HUSK_BIN_DIR", dir.parent().expect("exe dir"));
    }
    let registry = Registry::start();
    let image = registry.push_oci_archive(&images::busybox_archive(), "1", "husk/busybox");
    let mut huskd = Huskd::start(&registry.host);
    let huskd_pid = huskd.pid().expect("huskd runs");
    let c = Containerd::start();
    let logs = tempfile::Builder::new()
        .prefix("husk-bench-cri-")
        .tempdir()
        .expect("temp dir");
    let rt = husk_tests::pod::runtime();
    // The CRI clients' lazy channels spawn on the runtime.
    let _rt_context = rt.enter();
    let targets = [
        Target {
            name: "huskd",
            cri: Cri::connect(&huskd.socket),
            handler: "kata",
            log_root: logs.path().to_path_buf(),
            cgroup_parent: "/husk-bench-huskd".into(),
            image: image.clone(),
        },
        Target {
            name: "containerd + husk",
            cri: c.cri(),
            handler: HANDLER_HUSK,
            log_root: c.pod_log_root().to_path_buf(),
            cgroup_parent: c.cgroup_parent(),
            image: images::BUSYBOX.into(),
        },
        Target {
            name: "containerd + runc",
            cri: c.cri(),
            handler: HANDLER_RUNC,
            log_root: c.pod_log_root().to_path_buf(),
            cgroup_parent: c.cgroup_parent(),
            image: images::BUSYBOX.into(),
        },
    ];
    let (start, rate, rss) = rt.block_on(async {
        huskd.pull(&image).await;
        // One unmeasured pod each: image unpack and first-use caches.
        for t in &targets {
            let (id, _) = start_pod(t, &format!("warm-{}", t.handler)).await;
            remove(t, vec![id]).await;
        }
        let mut start: [Vec<f64>; 3] = Default::default();
        for r in 0..runs {
            for k in 0..3 {
                let i = (r + k) % 3;
                let t = &targets[i];
                let (id, took) = start_pod(t, &format!("start-{}-{r}", t.handler)).await;
                start[i].push(took.as_secs_f64() * 1000.0);
                remove(t, vec![id]).await;
            }
            eprintln!(
                "run {r}: huskd {:.0} ms, containerd + husk {:.0} ms, containerd + runc {:.0} ms",
                start[0][r], start[1][r], start[2][r]
            );
        }
        let mut rate = [0f64; 3];
        for (i, t) in targets.iter().enumerate() {
            rate[i] = pods_per_minute(t, burst).await;
            eprintln!("{}: {:.1} pods/min with 4 in parallel", t.name, rate[i]);
        }
        let cpid = containerd_pid();
        let rss = [
            rss_mib(huskd_pid),
            rss_with_pods(&targets[0], pods, huskd_pid).await,
            rss_mib(cpid),
            rss_with_pods(&targets[1], pods, cpid).await,
            rss_with_pods(&targets[2], pods, cpid).await,
        ];
        (start, rate, rss)
    });
    let swept = c.stop();
    huskd.stop();
    drop(registry);
    assert!(swept.is_empty(), "the harness had to sweep: {swept:?}");
    let m: Vec<f64> = start.iter().map(|s| median(s.clone())).collect();
    println!("| busybox pod | huskd | containerd + husk | containerd + runc | huskd / containerd + husk |");
    println!("|---|---|---|---|---|");
    println!(
        "| pod start → first log line, median of {runs} (ms) | {:.0} | {:.0} | {:.0} | {:.2} |",
        m[0],
        m[1],
        m[2],
        m[0] / m[1]
    );
    println!(
        "| pods started per minute, {burst} pods, 4 in parallel | {:.1} | {:.1} | {:.1} | {:.2} |",
        rate[0],
        rate[1],
        rate[2],
        rate[0] / rate[1]
    );
    println!(
        "| CRI server RSS, idle → {pods} pods (MiB) | {:.1} → {:.1} | {:.1} → {:.1} | → {:.1} | |",
        rss[0], rss[1], rss[2], rss[3], rss[4]
    );
}
