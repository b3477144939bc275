//! husk-bench-containerd: pods through containerd's CRI, husk vs runc. Run it where KVM
//! works (inside the lab: `tests/lab/run -- target/release/husk-bench-containerd --runs 10`).
//!
//! - pod start: RunPodSandbox → CreateContainer + StartContainer of busybox
//!   (`echo up; sleep`) → the first line `up` in the container's CRI log. Handler `husk` and
//!   `runc` on the same image, alternating (which goes first alternates too); median of
//!   `--runs` each.
//! - host PSS per idle pod: `--pods` (default 10) such pods started one after another, then
//!   the sum of `Pss` (`/proc/PID/smaps_rollup`) of the pods' host processes over the number
//!   of pods. husk: shim + husk-vmm (with its helper) + virtiofsd; runc: shim + pause (the
//!   busybox `sleep` of a runc pod runs on the host too and is not counted; husk's runs in
//!   the guest, whose memory is in the VMM's PSS).
use husk_tests::bench::{arg, median};
use std::time::{Duration, Instant};

use husk_tests::containerd::cri::wait_log_line;
use husk_tests::containerd::{images, Containerd, Cri, HANDLER_HUSK, HANDLER_RUNC};

/// Runs a busybox pod with `handler` up to its first log line; returns the pod id and the
/// time it took.
async fn start_pod(c: &Containerd, cri: &mut Cri, name: &str, handler: &str) -> (String, Duration) {
    let t = Instant::now();
    let pod = c
        .run_pod(cri, name, handler)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    cri.run_container(
        &pod,
        "c",
        images::BUSYBOX,
        &["sh", "-c", "echo up; exec sleep 3600"],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    wait_log_line(
        &pod.log_dir().join("c.log"),
        Duration::from_secs(120),
        |l| l.text == "up",
    )
    .await;
    (pod.id, t.elapsed())
}

/// `Pss` of one process in KiB (0 if it is gone).
fn pss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The summed PSS (KiB) of the pods' host processes: this containerd's shims, husk-vmm,
/// virtiofsd and pause processes.
fn pods_pss_kib(socket: &str) -> (u64, usize) {
    let mut total = 0;
    let mut n = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if pid.parse::<u32>().is_err() {
            continue;
        }
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        let cmd =
            String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).unwrap_or_default())
                .replace('\0', " ");
        let ours = (comm.starts_with("containerd-shim") && cmd.contains(socket))
            || comm == "husk-vmm"
            || comm.starts_with("virtiofsd")
            || comm == "pause";
        if ours {
            total += pss_kib(&pid);
            n += 1;
        }
    }
    (total, n)
}

fn main() {
    let runs = arg("--runs", 10);
    let pods = arg("--pods", 10);
    if std::env::var_os("HUSK_BIN_DIR").is_none() {
        // The shim, husk-vmm and pause next to this binary (target/release), not debug's.
        let dir = std::env::current_exe().expect("current exe");
        std::env::set_var("HUSK_BIN_DIR", dir.parent().expect("exe dir"));
    }
    let c = Containerd::start();
    let socket = c.socket().to_string_lossy().into_owned();
    let rt = husk_tests::pod::runtime();
    let handlers = [HANDLER_HUSK, HANDLER_RUNC];
    let (start, pss) = rt.block_on(async {
        let mut cri = c.cri();
        // One unmeasured pod each: image unpack and first-use caches.
        for h in handlers {
            let (id, _) = start_pod(&c, &mut cri, &format!("warm-{h}"), h).await;
            cri.stop_remove_pod(&id)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let mut start: [Vec<f64>; 2] = [vec![], vec![]];
        for r in 0..runs {
            for k in 0..2 {
                let i = (r + k) % 2;
                let h = handlers[i];
                let (id, took) = start_pod(&c, &mut cri, &format!("start-{h}-{r}"), h).await;
                start[i].push(took.as_secs_f64() * 1000.0);
                cri.stop_remove_pod(&id)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            eprintln!(
                "run {r}: husk {:.0} ms, runc {:.0} ms",
                start[0][r], start[1][r]
            );
        }
        let mut pss = [0f64; 2];
        for (i, h) in handlers.iter().enumerate() {
            let (base, _) = pods_pss_kib(&socket);
            let mut ids = Vec::new();
            for p in 0..pods {
                ids.push(start_pod(&c, &mut cri, &format!("idle-{h}-{p}"), h).await.0);
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            let (total, procs) = pods_pss_kib(&socket);
            pss[i] = (total.saturating_sub(base)) as f64 / 1024.0 / pods as f64;
            eprintln!("{h}: {pods} pods, {procs} processes, {total} KiB PSS (baseline {base} KiB)");
            for id in ids {
                cri.stop_remove_pod(&id)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }
        (start, pss)
    });
    let swept = c.stop();
    assert!(swept.is_empty(), "the harness had to sweep: {swept:?}");
    let (sh, sr) = (median(start[0].clone()), median(start[1].clone()));
    println!("| containerd CRI, busybox pod | husk | runc | husk / runc |");
    println!("|---|---|---|---|");
    println!(
        "| pod start → first log line, median of {runs} (ms) | {sh:.0} | {sr:.0} | {:.2} |",
        sh / sr
    );
    println!(
        "| host PSS per idle pod, {pods} pods (MiB) | {:.1} | {:.1} | {:.2} |",
        pss[0],
        pss[1],
        pss[0] / pss[1]
    );
}
