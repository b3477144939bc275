//! Through containerd's CRI with the `kata` handler: a memory limit OOM-kills in the guest
//! and CRI says `OOMKilled`; a SIGKILLed husk-vmm ends every task of the pod with 255 and
//! the pod turns NotReady; stats, resource updates and pause/resume reach the guest's
//! cgroup; a SIGKILLed shim is cleaned up by containerd's `delete`; run/stop/remove cycles
//! leave nothing. Each test ends with a leak snapshot.
use std::time::{Duration, Instant};

use husk_tests::containerd::cri::{wait_log_line, ContainerState};
use husk_tests::containerd::{images, Containerd, HANDLER_KATA};
use husk_tests::leaks::Snapshot;
use k8s_cri::v1 as cri;

/// Runs `body` against a fresh containerd, then checks that the host is back where it was.
pub(super) fn with_containerd(
    body: impl AsyncFnOnce(&Containerd, &mut husk_tests::containerd::Cri),
) {
    husk_tests::require_kvm();
    let c = Containerd::start();
    let before = c.host_state();
    let vm_before = Snapshot::take();
    husk_tests::pod::runtime().block_on(async {
        let mut cri = c.cri();
        body(&c, &mut cri).await;
    });
    before.assert_back_to(|| c.host_state());
    let swept = c.stop();
    assert!(swept.is_empty(), "the harness had to sweep: {swept:?}");
    vm_before.assert_nothing_leaked();
}

pub(super) fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn with_memory_limit(bytes: i64) -> cri::LinuxContainerConfig {
    cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: bytes,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// containerd's event stream (`ctr events`), collected line by line from a background
/// thread until dropped.
struct EventStream {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl EventStream {
    /// Subscribes, and returns once the subscription is known to be live (an event we
    /// cause, a namespace label update, came through).
    async fn subscribe(c: &Containerd) -> EventStream {
        use std::io::BufRead;
        let mut child = std::process::Command::new("/usr/bin/ctr")
            .arg("-a")
            .arg(c.socket())
            .arg("events")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run ctr events");
        let out = child.stdout.take().expect("ctr events' stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let l = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                l.lock().unwrap().push(line);
            }
        });
        let s = EventStream {
            child,
            lines,
            reader: Some(reader),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        for n in 0.. {
            let out = c.ctr(&["namespaces", "label", "k8s.io", &format!("husk-probe={n}")]);
            assert!(out.status.success(), "ctr namespaces label: {out:?}");
            tokio::time::sleep(Duration::from_millis(500)).await;
            if s.lines().iter().any(|l| l.contains("/namespaces/update")) {
                break;
            }
            assert!(Instant::now() < deadline, "ctr events saw nothing in 30 s");
        }
        s
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

#[test]
fn a_memory_limit_oom_kills_in_the_guest_and_cri_says_oomkilled() {
    with_containerd(async |c, cri| {
        let pod = ok(c.run_pod(cri, "oom-pod", HANDLER_KATA).await);
        let events = EventStream::subscribe(c).await;
        let id = ok(cri
            .run_container_with(
                &pod,
                "hog",
                images::BUSYBOX,
                &[
                    "sh",
                    "-c",
                    "cat /sys/fs/cgroup/memory.max; dd if=/dev/zero of=/dev/null bs=64M count=1",
                ],
                with_memory_limit(16 << 20),
            )
            .await);
        let log = pod.log_dir().join("hog.log");
        wait_log_line(&log, Duration::from_secs(60), |l| {
            l.stream == "stdout" && l.text == "16777216"
        })
        .await;
        let st = ok(cri.wait_exited(&id, Duration::from_secs(60)).await);
        assert_eq!(st.exit_code, 137, "dd is SIGKILLed: {st:?}");
        // CRI sets the reason when it handles TaskOOM (asynchronously to the exit's
        // handling, so ContainerStatus may lag behind it a little).
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut st = st;
        while st.reason != "OOMKilled" {
            assert!(
                Instant::now() < deadline,
                "no OOMKilled within 10 s of the exit: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            st = ok(cri.container_status(&id).await);
        }
        // containerd's order: TaskOOM before the TaskExit of the task it killed.
        let lines = events.lines();
        let of_hog: Vec<&str> = lines
            .iter()
            .filter(|l| l.contains(&format!("\"container_id\":\"{id}\"")))
            .filter_map(|l| {
                if l.contains("/tasks/oom") {
                    Some("oom")
                } else if l.contains("/tasks/exit") {
                    Some("exit")
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(
            of_hog.first(),
            Some(&"oom"),
            "TaskOOM must come before TaskExit: {of_hog:?}\n{}",
            lines.join("\n")
        );
        assert!(of_hog.contains(&"exit"), "no TaskExit: {of_hog:?}");
        drop(events);
        ok(cri.stop_remove_pod(&pod.id).await);
    });
}

#[test]
fn a_killed_vmm_exits_every_task_with_255_and_the_pod_is_not_ready() {
    with_containerd(async |c, cri| {
        let pod = ok(c.run_pod(cri, "dead-vm", HANDLER_KATA).await);
        let id = ok(cri
            .run_container(&pod, "sleeper", images::BUSYBOX, &["sleep", "600"])
            .await);
        let st = ok(cri.container_status(&id).await);
        assert_eq!(st.state, ContainerState::ContainerRunning as i32, "{st:?}");
        assert!(ok(cri.pod_ready(&pod.id).await), "the pod is ready first");
        let vmms = super::vmm_pids();
        assert_eq!(vmms.len(), 1, "one husk-vmm: {vmms:?}");
        // SAFETY: kill(2) of a pid we just read; a race with its exit only fails the call.
        assert_eq!(unsafe { libc::kill(vmms[0] as i32, libc::SIGKILL) }, 0);

        let st = ok(cri.wait_exited(&id, Duration::from_secs(60)).await);
        assert_eq!(st.exit_code, 255, "the VM died under it: {st:?}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while ok(cri.pod_ready(&pod.id).await) {
            assert!(
                Instant::now() < deadline,
                "the pod is still ready 30 s after its VMM was killed"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ok(cri.stop_remove_pod(&pod.id).await);
        assert!(super::vmm_pids().is_empty(), "no husk-vmm left");
    });
}

/// Lines of a CRI log whose text is a number.
fn counted(log: &std::path::Path) -> usize {
    husk_tests::containerd::cri::parse_log(&std::fs::read_to_string(log).unwrap_or_default())
        .iter()
        .filter(|l| l.text.parse::<u64>().is_ok())
        .count()
}

#[test]
fn stats_update_and_pause_reach_the_guest_cgroup() {
    with_containerd(async |c, cri| {
        let pod = ok(c.run_pod(cri, "res-pod", HANDLER_KATA).await);
        let id = ok(cri
            .run_container_with(
                &pod,
                "ticker",
                images::BUSYBOX,
                &[
                    "sh",
                    "-c",
                    "i=0; while :; do i=$((i+1)); echo $i; sleep 0.2; done",
                ],
                with_memory_limit(64 << 20),
            )
            .await);
        let log = pod.log_dir().join("ticker.log");
        wait_log_line(&log, Duration::from_secs(60), |l| l.text == "3").await;

        // Stats: the guest cgroup's CPU and memory, as containerd's cgroups v2 Metrics.
        let s = cri.container_stats(&id).await.unwrap_or_else(|e| {
            let log = std::fs::read_to_string(c.dir().join("containerd.log")).unwrap_or_default();
            let tail: Vec<_> = log.lines().rev().take(40).collect();
            panic!(
                "{e}\n--- containerd log, last lines first ---\n{}",
                tail.join("\n")
            )
        });
        let cpu = s
            .cpu
            .as_ref()
            .and_then(|c| c.usage_core_nano_seconds.as_ref());
        let mem = s.memory.as_ref().and_then(|m| m.working_set_bytes.as_ref());
        assert!(cpu.is_some_and(|v| v.value > 0), "cpu: {s:?}");
        assert!(mem.is_some_and(|v| v.value > 0), "memory: {s:?}");

        // Update: the container's memory.max in the guest follows.
        let r = ok(cri
            .exec_sync(&id, &["cat", "/sys/fs/cgroup/memory.max"], 0)
            .await);
        assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "67108864");
        ok(cri
            .update_resources(
                &id,
                cri::LinuxContainerResources {
                    memory_limit_in_bytes: 128 << 20,
                    ..Default::default()
                },
            )
            .await);
        let r = ok(cri
            .exec_sync(&id, &["cat", "/sys/fs/cgroup/memory.max"], 0)
            .await);
        assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "134217728");

        // Pause (ctr; CRI has none): the ticker stops; resume: it goes on.
        let out = c.ctr_timeout(&["task", "pause", &id], Duration::from_secs(30));
        assert!(out.status.success(), "ctr task pause: {out:?}");
        let out = c.ctr_timeout(&["task", "ls"], Duration::from_secs(30));
        let ls = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            ls.lines()
                .any(|l| l.starts_with(&id) && l.contains("PAUSED")),
            "{ls}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let frozen = counted(&log);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(counted(&log), frozen, "the ticker ran while paused");
        let out = c.ctr_timeout(&["task", "resume", &id], Duration::from_secs(30));
        assert!(out.status.success(), "ctr task resume: {out:?}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while counted(&log) <= frozen {
            assert!(Instant::now() < deadline, "no tick within 10 s of resume");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ok(cri.stop_remove_pod(&pod.id).await);
    });
}

/// The pid of this containerd's one husk shim.
fn shim_pid(c: &Containerd) -> i32 {
    let shims: Vec<i32> = c
        .host_state()
        .shims
        .iter()
        .filter_map(|s| s.rsplit_once('[')?.1.strip_suffix(']')?.parse().ok())
        .collect();
    assert_eq!(shims.len(), 1, "one shim for the pod: {shims:?}");
    shims[0]
}

/// Polls `done` every 100 ms; panics with `what` after `timeout`.
async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the shim of `pod` keeps under the husk run root: its state file and share dir.
fn husk_leftovers() -> Vec<String> {
    let root = husk_shim::paths::run_root();
    ["sandbox", "share"]
        .iter()
        .flat_map(|d| {
            std::fs::read_dir(root.join(d))
                .into_iter()
                .flatten()
                .flatten()
                .map(move |e| format!("{d}/{}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// How a cycle's pod ends.
#[derive(Clone, Copy, Debug)]
enum End {
    Clean,
    KillVmm,
    KillShim,
}

/// One pod: run, a container that logs, then ended as `end`, then Stop + Remove.
async fn pod_cycle(c: &Containerd, cri: &mut husk_tests::containerd::Cri, n: usize, end: End) {
    let name = format!("cycle-{n}");
    let pod = ok(c.run_pod(cri, &name, HANDLER_KATA).await);
    let id = ok(cri
        .run_container(
            &pod,
            "c",
            images::BUSYBOX,
            &["sh", "-c", "echo up; sleep 600"],
        )
        .await);
    wait_log_line(&pod.log_dir().join("c.log"), Duration::from_secs(60), |l| {
        l.text == "up"
    })
    .await;
    assert!(
        !husk_leftovers().is_empty(),
        "a running pod has a state file and a share"
    );
    match end {
        End::Clean => {}
        End::KillVmm => {
            let vmms = super::vmm_pids();
            assert_eq!(vmms.len(), 1, "{vmms:?}");
            // SAFETY: kill(2) of the pod's VMM, just found.
            assert_eq!(unsafe { libc::kill(vmms[0] as i32, libc::SIGKILL) }, 0);
        }
        End::KillShim => {
            let pid = shim_pid(c);
            // SAFETY: kill(2) of this containerd's husk shim, just found.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        }
    }
    if !matches!(end, End::Clean) {
        let st = ok(cri.wait_exited(&id, Duration::from_secs(60)).await);
        assert_ne!(st.exit_code, 0, "{end:?}: {st:?}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while ok(cri.pod_ready(&pod.id).await) {
            assert!(Instant::now() < deadline, "{end:?}: pod still ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    if matches!(end, End::KillShim) {
        // containerd ran our `delete` for the dead shim's tasks: the VM, its mounts, share
        // and state went with it, before any StopPodSandbox.
        wait_until(
            "no husk-vmm, state file or share after the shim was killed",
            // containerd's cleanup of a dead shim runs our `delete` as a new process; on a
            // loaded 2-core lab that once took longer than 30 s.
            Duration::from_secs(90),
            || super::vmm_pids().is_empty() && husk_leftovers().is_empty(),
        )
        .await;
    }
    ok(cri.stop_remove_pod(&pod.id).await);
    assert!(super::vmm_pids().is_empty(), "{end:?}: a husk-vmm is left");
}

#[test]
fn a_killed_shim_is_cleaned_up_by_containerds_delete() {
    with_containerd(async |c, cri| pod_cycle(c, cri, 0, End::KillShim).await);
}

/// Run/stop/remove cycles, every third with a killed VMM and every third with a killed
/// shim, leave nothing behind. `HUSK_CYCLES` (default 5) sets how many: 50 for the long mode.
#[test]
fn pod_cycles_with_killed_vmms_and_shims_leave_nothing() {
    let cycles: usize = std::env::var("HUSK_CYCLES")
        .ok()
        .map(|v| v.parse().expect("HUSK_CYCLES is a number"))
        .unwrap_or(5);
    with_containerd(async |c, cri| {
        let before = c.host_state();
        for n in 0..cycles {
            let end = [End::Clean, End::KillVmm, End::KillShim][n % 3];
            let t = Instant::now();
            pod_cycle(c, cri, n, end).await;
            before.assert_back_to(|| c.host_state());
            eprintln!("cycle {n} ({end:?}): {:?}", t.elapsed());
        }
    });
}
