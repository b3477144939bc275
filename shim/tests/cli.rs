//! The `husk` CLI on the host, without a VM: what it does where microVMs cannot run.
use std::process::Command;

fn husk() -> Command {
    Command::new(env!("CARGO_BIN_EXE_husk"))
}

/// `husk run` where /dev/kvm is missing (hidden by a private /dev in a mount namespace, so
/// this holds on any host): it refuses with husk check's explanation, starts nothing, and
/// exits 125 like `docker run` does when the runtime itself fails.
#[test]
fn run_refuses_without_kvm_with_husk_checks_explanation() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (to hide /dev/kvm in a mount namespace)"
    );
    let husk = env!("CARGO_BIN_EXE_husk");
    let o = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /dev && exec {husk} run -- true; echo unreachable"
        ))
        .output()
        .expect("run unshare (util-linux)");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(err.contains("/dev/kvm does not exist"), "{err}");
    assert!(err.contains("cannot run husk microVMs"), "{err}");
    assert!(o.stdout.is_empty());
}

#[test]
fn check_explains_itself_either_way() {
    let o = husk().arg("check").output().unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(all.starts_with("husk check: "), "{all}");
    if o.status.success() {
        assert!(all.contains("ok"), "{all}");
    } else {
        assert_eq!(o.status.code(), Some(1));
        assert!(all.contains("/dev/kvm") || all.contains("PVM"), "{all}");
    }
}

#[test]
fn run_rejects_bad_arguments_before_booting() {
    let o = husk()
        .args(["run", "--vcpus", "none", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "clap's usage error");
    assert!(String::from_utf8_lossy(&o.stderr).contains("--vcpus"));
}
