//! `ctr run -t` with our runtime: the container's process gets a terminal in the guest.
//! The host side needs a pty of its own for ctr (`script(1)` gives it one), so the test
//! needs a usable `/dev/pts`.
use std::process::{Command, Stdio};
use std::time::Duration;

use husk_tests::containerd::{images, Containerd};
use husk_tests::leaks::Snapshot;

/// Runs `cmd` under `script -qec` (on a fresh pty), killed after `timeout`; its output.
fn on_a_pty(cmd: &str, timeout: Duration) -> (bool, String) {
    let child = Command::new("script")
        .args(["-qec", cmd, "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run script(1)");
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("wait for script"),
        Err(_) => {
            // SAFETY: our own child, not yet reaped (its waiter thread holds it).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            rx.recv()
                .expect("script's waiter")
                .expect("wait for script")
        }
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn ctr_run_t_gets_a_tty_in_the_guest() {
    husk_tests::require_kvm();
    // Not a skip: without a host pty the test cannot say anything, and says so.
    let pts_ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/ptmx")
        .is_ok()
        && std::fs::read_dir("/dev/pts").is_ok();
    assert!(pts_ok, "this host has no usable /dev/ptmx + /dev/pts");
    let c = Containerd::start();
    let before = c.host_state();
    let vm_before = Snapshot::take();
    let cmd = format!(
        "/usr/bin/ctr -a {} -n k8s.io run -t --rm --runtime io.containerd.husk.v2 {} husk-tty \
         sh -c 'tty; echo tty-done'",
        c.socket().display(),
        images::BUSYBOX
    );
    let (ok, out) = on_a_pty(&cmd, Duration::from_secs(300));
    assert!(ok, "ctr run -t failed: {out}");
    assert!(out.contains("tty-done"), "{out}");
    assert!(
        // The guest's terminal echoes a NUL that reaches its input at start, as "^@" (not
        // yet explained; see the README's known limits): it must not hide the answer.
        out.lines()
            .any(|l| l.trim().trim_start_matches("^@").starts_with("/dev/pts/")),
        "the process has no terminal: {out}"
    );
    assert!(!out.contains("not a tty"), "{out}");
    before.assert_back_to(|| c.host_state());
    let swept = c.stop();
    assert!(swept.is_empty(), "the harness had to sweep: {swept:?}");
    vm_before.assert_nothing_leaked();
}
