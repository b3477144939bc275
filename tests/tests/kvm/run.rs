//! `husk run`, the CLI, end to end: a command in a container in a fresh microVM.
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_tests::cmd::{output_within, read_within, Output};
use husk_tests::leaks::Snapshot;

/// The longest one `husk run` may take in these tests (boot, command, teardown): a VM that
/// dies quietly fails the test instead of hanging the lab.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

fn husk() -> Command {
    let mut c = Command::new(husk_tests::bin_dir().join("husk"));
    c.env("HUSK_GUEST_DIR", husk_tests::guest_dir())
        .stdin(Stdio::null());
    c
}

fn run(args: &[&str]) -> Output {
    output_within(husk().arg("run").args(args), None, RUN_TIMEOUT)
}

/// The first `n` bytes `husk run` prints, within `RUN_TIMEOUT`; kills it and fails the
/// test when they do not come.
fn first_output(child: &mut Child, n: usize) -> Vec<u8> {
    let out = child.stdout.take().expect("stdout piped");
    read_within(out, Some(n), RUN_TIMEOUT).unwrap_or_else(|e| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the container's first output: {e}")
    })
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn husk_run_prints_output_and_exits_with_the_commands_status() {
    husk_tests::require_kvm();
    let before = Snapshot::take();
    let o = run(&["--", "sh", "-c", "echo ok; echo oops >&2; exit 3"]);
    assert_eq!(o.status.code(), Some(3), "stderr: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "ok\n");
    assert_eq!(text(&o.stderr), "oops\n");
    before.assert_nothing_leaked();
}

#[test]
fn husk_run_default_command_greets_from_the_guest_kernel() {
    husk_tests::require_kvm();
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.starts_with("hello from a husk microVM\nLinux husk "),
        "{out}"
    );
    // The guest's kernel, not the lab's or the host's.
    let host = Command::new("uname").arg("-r").output().unwrap();
    assert!(!out.contains(text(&host.stdout).trim()), "{out}");
}

#[test]
fn husk_run_uses_an_image_directory_over_virtio_fs_and_forwards_stdin() {
    husk_tests::require_kvm();
    let before = Snapshot::take();
    let dir = std::env::temp_dir().join(format!("husk-run-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    husk_tests::busybox_rootfs(&dir, &["sh", "cat", "wc"]);
    std::fs::write(dir.join("etc/motd"), "from the host's image\n").unwrap();
    let o = output_within(
        husk().args(["run", "-i", "--image"]).arg(&dir).args([
            "--",
            "sh",
            "-c",
            "cat /etc/motd; cat > /from-guest; wc -c < /from-guest",
        ]),
        Some(b"piped through vsock\n"),
        RUN_TIMEOUT,
    );
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "from the host's image\n20\n");
    assert_eq!(
        std::fs::read_to_string(dir.join("from-guest")).unwrap(),
        "piped through vsock\n"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    before.assert_nothing_leaked();
}

#[test]
fn husk_run_reports_a_dead_vmm_and_cleans_up() {
    husk_tests::require_kvm();
    let before = Snapshot::take();
    let mut child = husk()
        .args(["run", "--", "sh", "-c", "echo up; sleep 600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(first_output(&mut child, 3), b"up\n");
    let vmm = vmm_child_of(child.id()).expect("husk-vmm under husk run");
    // The guest dies under husk: the VMM is killed.
    unsafe_kill(vmm, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "husk run hangs after its VMM died"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = read_within(child.stderr.take().unwrap(), None, Duration::from_secs(30))
        .map(|b| text(&b))
        .unwrap_or_else(|e| panic!("husk run's stderr to its end: {e}"));
    assert_eq!(status.code(), Some(125), "{err}");
    assert!(err.contains("husk run:"), "{err}");
    before.assert_nothing_leaked();
}

#[test]
fn killing_husk_run_takes_its_vm_down() {
    husk_tests::require_kvm();
    let before = Snapshot::take();
    let mut child = husk()
        .args(["run", "--", "sh", "-c", "echo up; sleep 600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert_eq!(first_output(&mut child, 3), b"up\n");
    assert!(vmm_child_of(child.id()).is_some());
    child.kill().unwrap();
    child.wait().unwrap();
    // Its VMM and virtiofsd die with it; the run directory it could not remove is swept by
    // the next husk run.
    let o = run(&["--", "true"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    before.assert_nothing_leaked();
}

#[test]
fn husk_run_refuses_a_missing_image_clearly() {
    husk_tests::require_kvm();
    let before = Snapshot::take();
    let o = run(&["--image", "/nonexistent/rootfs", "--", "true"]);
    assert_eq!(o.status.code(), Some(125));
    let err = text(&o.stderr);
    assert!(err.contains("/nonexistent/rootfs"), "{err}");
    let o = run(&["--", "/bin/no-such-command"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        text(&o.stderr).contains("no-such-command"),
        "{}",
        text(&o.stderr)
    );
    before.assert_nothing_leaked();
}

fn vmm_child_of(pid: u32) -> Option<i32> {
    let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    let mut all = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        if let Ok(k) = std::fs::read_to_string(task.path().join("children")) {
            all.extend(k.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    all.extend(
        kids.split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok()),
    );
    all.into_iter().find(|p| {
        std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "husk-vmm")
    })
}

fn unsafe_kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) takes no pointers.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}
