//! The containerd harness proven on this host with the `runc` handler (no KVM needed): a
//! real containerd 1.6 with its CRI plugin, CNI, the pause and busybox images built by the
//! harness, driven through CRI the way kubelet drives it. The same harness runs the `husk`
//! handler in the lab.
//!
//! These fail, never skip, when containerd, runc or the CNI plugins are missing.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use husk_tests::containerd::cri::{wait_log_line, ContainerState};
use husk_tests::containerd::{
    images, Containerd, HANDLER_HUSK_BAD_CONFIG, HANDLER_HUSK_NO_VMM, HANDLER_RUNC,
};

/// One test at a time: pause processes, CNI netns and veths are host-wide, so a leak
/// snapshot taken while another test's pod runs would see it.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Stops containerd and checks that nothing had to be swept and that its bridge and
/// directory are gone.
fn stop_clean(c: Containerd) {
    let bridge = c.bridge().to_string();
    let dir = c.dir().to_path_buf();
    let cgroup = c.cgroup_parent();
    let swept = c.stop();
    assert!(swept.is_empty(), "the harness had to sweep: {swept:?}");
    assert!(
        !std::path::Path::new("/sys/class/net")
            .join(&bridge)
            .exists(),
        "bridge {bridge} left behind"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
    let cg = std::path::Path::new("/sys/fs/cgroup/memory").join(&cgroup[1..]);
    assert!(!cg.exists(), "cgroup {} left behind", cg.display());
}

#[test]
fn runc_pod_echo_lands_in_the_cri_log_and_teardown_leaves_nothing() {
    let _g = serial();
    let c = Containerd::start();
    let before = c.host_state();
    let rt = husk_tests::pod::runtime();
    rt.block_on(async {
        let mut cri = c.cri();
        let pod = c
            .run_pod(&mut cri, "echo", HANDLER_RUNC)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mid = c.host_state();
        assert_eq!(
            mid.netns.len(),
            before.netns.len() + 1,
            "one pod netns: {mid:?}"
        );
        assert!(
            mid.shims.len() > before.shims.len(),
            "a runc shim runs: {mid:?}"
        );

        let id = cri
            .run_container(
                &pod,
                "hello",
                images::BUSYBOX,
                &[
                    "sh",
                    "-c",
                    "echo hello from the harness; echo to stderr >&2",
                ],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let st = cri
            .wait_exited(&id, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(st.exit_code, 0, "{st:?}");
        assert_eq!(st.reason, "Completed", "{st:?}");
        let log = pod.log_dir().join("hello.log");
        let lines = wait_log_line(&log, Duration::from_secs(10), |l| {
            l.stream == "stdout" && l.tag == "F" && l.text == "hello from the harness"
        })
        .await;
        assert!(
            lines
                .iter()
                .any(|l| l.stream == "stderr" && l.text == "to stderr"),
            "stderr line missing: {lines:?}"
        );

        cri.stop_remove_pod(&pod.id)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(cri.pod_ids().await.unwrap().is_empty());
    });
    before.assert_back_to(|| c.host_state());
    stop_clean(c);
}

#[test]
fn runc_exec_sync_returns_output_and_exit_code_and_times_out() {
    let _g = serial();
    let c = Containerd::start();
    let before = c.host_state();
    let rt = husk_tests::pod::runtime();
    rt.block_on(async {
        let mut cri = c.cri();
        let pod = c
            .run_pod(&mut cri, "exec", HANDLER_RUNC)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let id = cri
            .run_container(&pod, "sleeper", images::BUSYBOX, &["sleep", "600"])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let st = cri.container_status(&id).await.unwrap();
        assert_eq!(st.state, ContainerState::ContainerRunning as i32, "{st:?}");

        let r = cri
            .exec_sync(&id, &["sh", "-c", "echo out; echo err >&2; exit 3"], 0)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(String::from_utf8_lossy(&r.stdout), "out\n");
        assert_eq!(String::from_utf8_lossy(&r.stderr), "err\n");
        assert_eq!(r.exit_code, 3);

        // A timed-out ExecSync must come back (containerd kills the process and waits for
        // its FIFOs to reach EOF; a shim that kept a writer open would hang it forever).
        let t = Instant::now();
        let r = cri.exec_sync(&id, &["sleep", "60"], 1).await;
        let took = t.elapsed();
        assert!(
            took < Duration::from_secs(20),
            "ExecSync timeout took {took:?}: {r:?}"
        );
        assert!(
            took >= Duration::from_secs(1),
            "ExecSync returned early: {r:?}"
        );
        if let Ok(r) = &r {
            assert_ne!(r.exit_code, 0, "a killed exec reports failure: {r:?}");
        }

        cri.stop_remove_pod(&pod.id)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    });
    before.assert_back_to(|| c.host_state());
    stop_clean(c);
}

/// Our shim through containerd 1.6's CRI, on any host: containerd runs its `start`, dials
/// the address it printed and calls `containerd.task.v2.Task/Create`, and the shim's own
/// error comes back: on this KVM-less host "cannot run husk microVMs", on a KVM host the
/// missing VMM of the handler's config. A config with an unknown key fails `start` with the
/// key named (runtime options → ConfigPath → husk.toml). Nothing is left afterwards: no
/// shim process, socket, mount, netns or veth.
#[test]
fn husk_shim_answers_through_containerd_and_fails_cleanly() {
    let _g = serial();
    let shim = husk_tests::containerd::shim_binary();
    assert!(
        shim.is_file(),
        "{} is missing: cargo build --workspace --bins (scripts/test does)",
        shim.display()
    );
    let c = Containerd::start();
    let before = c.host_state();
    let rt = husk_tests::pod::runtime();
    let (no_vmm, bad_config) = rt.block_on(async {
        let mut cri = c.cri();
        (
            c.run_pod(&mut cri, "novmm", HANDLER_HUSK_NO_VMM).await,
            c.run_pod(&mut cri, "badconfig", HANDLER_HUSK_BAD_CONFIG)
                .await,
        )
    });
    let msg = match no_vmm {
        Ok(pod) => panic!("a pod {} ran with no VMM binary", pod.id),
        Err(e) => e.status.message().to_string(),
    };
    let expected = match husk_vmm_api::check::check_host() {
        Err(_) => "this host cannot run husk microVMs",
        Ok(()) => "/nonexistent/husk-vmm",
    };
    assert!(
        msg.contains("failed to create shim task") && msg.contains(expected),
        "RunPodSandbox failed, but not with the shim's Create answer ({expected:?}): {msg}"
    );
    let msg = match bad_config {
        Ok(pod) => panic!("a pod {} ran with a bad config", pod.id),
        Err(e) => e.status.message().to_string(),
    };
    assert!(
        msg.contains("no_such_key") && msg.contains("husk-badconfig.toml"),
        "the shim's start did not name the bad key and file: {msg}"
    );
    // Plain `ctr run` with our runtime: no runtime options, so the shim's defaults
    // (/etc/husk/husk.toml absent: built-in defaults, the build tree's VMM and guest).
    let out = c.ctr_timeout(
        &[
            "run",
            "--rm",
            "--runtime",
            "io.containerd.husk.v2",
            images::BUSYBOX,
            "ctr-husk",
            "echo",
            "hi",
        ],
        Duration::from_secs(300),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    match husk_vmm_api::check::check_host() {
        Err(_) => assert!(
            !out.status.success() && stderr.contains("this host cannot run husk microVMs"),
            "ctr run with our runtime must fail in the shim's Create here: {stderr}"
        ),
        Ok(()) => assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n", "{stderr}"),
    }
    before.assert_back_to(|| c.host_state());
    stop_clean(c);
}
