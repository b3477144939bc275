//! huskd's Prometheus endpoint (off by default; `[huskd] metrics_address`): what an operator
//! graphs and alerts on. Counters and histograms are process-wide atomics bumped where the
//! events happen (one static, as Prometheus client libraries keep theirs); pod and container
//! counts by state are read from huskd's tables at scrape time, so they are right after a
//! restart too.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::containers::{ContainerState, Containers, Filter};
use crate::pods::{PodState, Pods};

/// Upper bounds (seconds) of the start-time histograms: a pod VM takes well under a second
/// on hardware KVM and tens of seconds nested under TCG.
const BOUNDS: [f64; 11] = [
    0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];

pub struct Histogram {
    buckets: [AtomicU64; BOUNDS.len()],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    const fn new() -> Histogram {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; BOUNDS.len()],
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BOUNDS.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, n) in BOUNDS.iter().zip(&self.buckets) {
            cumulative += n.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

pub struct Metrics {
    /// RunPodSandbox, from the call to the pod Ready (successes only).
    pub pod_start: Histogram,
    /// The shim's sandbox Create + Start: the VM booting to an agent that answers.
    pub vm_boot: Histogram,
    pub pod_start_failures: AtomicU64,
    pub pulls: AtomicU64,
    pub pull_failures: AtomicU64,
    /// Layer bytes downloaded (compressed, as the registry served them).
    pub pull_bytes: AtomicU64,
    pub cni_errors: AtomicU64,
    /// Calls to a shim that failed, and shims that could not be started.
    pub shim_errors: AtomicU64,
    /// Task events the shims forwarded to huskd's events socket.
    pub shim_events: AtomicU64,
}

pub static METRICS: Metrics = Metrics {
    pod_start: Histogram::new(),
    vm_boot: Histogram::new(),
    pod_start_failures: AtomicU64::new(0),
    pulls: AtomicU64::new(0),
    pull_failures: AtomicU64::new(0),
    pull_bytes: AtomicU64::new(0),
    cni_errors: AtomicU64::new(0),
    shim_errors: AtomicU64::new(0),
    shim_events: AtomicU64::new(0),
};

/// Adds one to a counter.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

fn counter(out: &mut String, name: &str, help: &str, c: &AtomicU64) {
    let v = c.load(Relaxed);
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
    );
}

/// The exposition text (Prometheus text format 0.0.4).
pub async fn render(pods: &Pods, containers: &Containers) -> String {
    let mut out = String::new();
    let all_pods = pods.list().await;
    let _ = writeln!(
        out,
        "# HELP huskd_pods Pod sandboxes by state.\n# TYPE huskd_pods gauge"
    );
    for (state, label) in [(PodState::Ready, "ready"), (PodState::NotReady, "notready")] {
        let n = all_pods.iter().filter(|p| p.state == state).count();
        let _ = writeln!(out, "huskd_pods{{state=\"{label}\"}} {n}");
    }
    let all = containers.list(&Filter::default());
    let _ = writeln!(
        out,
        "# HELP huskd_containers Containers by state.\n# TYPE huskd_containers gauge"
    );
    for (state, label) in [
        (ContainerState::Created, "created"),
        (ContainerState::Running, "running"),
        (ContainerState::Exited, "exited"),
    ] {
        let n = all.iter().filter(|c| c.state == state).count();
        let _ = writeln!(out, "huskd_containers{{state=\"{label}\"}} {n}");
    }
    let m = &METRICS;
    m.pod_start.render(
        &mut out,
        "huskd_pod_start_seconds",
        "RunPodSandbox to a Ready pod.",
    );
    m.vm_boot.render(
        &mut out,
        "huskd_vm_boot_seconds",
        "The pod VM's boot to an answering agent (the shim's sandbox Create and Start).",
    );
    counter(
        &mut out,
        "huskd_pod_start_failures_total",
        "RunPodSandbox calls that failed (and were undone).",
        &m.pod_start_failures,
    );
    counter(
        &mut out,
        "huskd_image_pulls_total",
        "Successful PullImage calls.",
        &m.pulls,
    );
    counter(
        &mut out,
        "huskd_image_pull_failures_total",
        "Failed PullImage calls.",
        &m.pull_failures,
    );
    counter(
        &mut out,
        "huskd_image_pull_bytes_total",
        "Layer bytes downloaded from registries.",
        &m.pull_bytes,
    );
    counter(
        &mut out,
        "huskd_cni_errors_total",
        "CNI ADD or DEL calls that failed.",
        &m.cni_errors,
    );
    counter(
        &mut out,
        "huskd_shim_errors_total",
        "Shim starts and shim calls that failed.",
        &m.shim_errors,
    );
    counter(
        &mut out,
        "huskd_shim_events_total",
        "Task events the shims forwarded to huskd's events socket.",
        &m.shim_events,
    );
    out
}

/// Serves `GET /metrics` on `addr` until the process ends; the address bound.
pub async fn serve(
    addr: SocketAddr,
    pods: Arc<Pods>,
    containers: Arc<Containers>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    info!(addr = %bound, "metrics endpoint listening");
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "metrics accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (pods, containers) = (pods.clone(), containers.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (pods, containers) = (pods.clone(), containers.clone());
                    async move {
                        let r = if req.method() == Method::GET && req.uri().path() == "/metrics" {
                            Response::builder()
                                .header("content-type", "text/plain; version=0.0.4")
                                .body(render(&pods, &containers).await)
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body("GET /metrics\n".to_string())
                        };
                        Ok::<_, std::convert::Infallible>(r.expect("a valid response"))
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .header_read_timeout(Duration::from_secs(10))
                    .timer(hyper_util::rt::TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), svc);
                let _ = conn.await;
            });
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_with_sum_and_count() {
        let h = Histogram::new();
        h.observe(Duration::from_millis(300));
        h.observe(Duration::from_secs(3));
        h.observe(Duration::from_secs(1000));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "help");
        assert!(out.contains("x_seconds_bucket{le=\"0.25\"} 0\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.5\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"5\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"300\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(
            out.contains("x_seconds_sum 1003.3\nx_seconds_count 3\n"),
            "{out}"
        );
    }
}
