//! A sandbox's host resources are cleaned up from its state on disk by a process that never
//! held them, after their owner was SIGKILLed: what the shim's `delete` and the next
//! `husk run` rely on. Runs on the host (root, no KVM): the "VM" processes are stand-ins,
//! the netns, tap, mount and sockets are real.
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use husk_shim::sandbox::network;
use husk_shim::sandbox::process::{ChildProcess, ProcessRef};
use husk_shim::sandbox::state::{self, NetnsRecord, ProcessRecord, StateFile, TapRecord};

const OWNER_ROOT: &str = "HUSK_TEST_OWNER_ROOT";
const OWNER_ID: &str = "HUSK_TEST_OWNER_ID";

fn mounts() -> String {
    std::fs::read_to_string("/proc/self/mounts").unwrap()
}

/// The owner, in a process of its own (this test binary again, see below): makes a
/// sandbox's worth of host resources, records them, says "ready" and waits to be killed.
// The survivor is never waited for: it must outlive this process.
#[allow(clippy::zombie_processes)]
fn be_the_owner(root: &Path, id: &str) -> ! {
    let mut st = StateFile::create(root, id).unwrap();
    let dir = st.dir().to_path_buf();
    let ns = dir.join("netns");
    st.update(|s| {
        s.netns = Some(NetnsRecord {
            path: ns.clone(),
            owned: true,
        })
    })
    .unwrap();
    network::create_netns(&ns).unwrap();
    let tap = network::open_tap(Some(&ns), "huskclean0").unwrap();
    st.update(|s| {
        s.taps.push(TapRecord {
            name: tap.name.clone(),
            netns: Some(ns.clone()),
            created: tap.created,
        })
    })
    .unwrap();
    let mnt = dir.join("rootfs");
    std::fs::create_dir(&mnt).unwrap();
    st.update(|s| s.mounts.push(mnt.clone())).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "husk-test", mnt.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(ok.success());
    // A process we own (it dies with us: PR_SET_PDEATHSIG) and one that outlives us, as a
    // VMM would if its parent-death signal were lost.
    let mut cmd = Command::new("sleep");
    cmd.arg("600");
    let owned = ChildProcess::spawn("sleep", cmd).unwrap();
    let survivor = Command::new("sleep").arg("600").spawn().unwrap();
    let survivor = ProcessRef::of(survivor.id() as i32).unwrap();
    st.update(|s| {
        s.processes.push(ProcessRecord {
            name: "owned".into(),
            process: owned.process_ref(),
        });
        s.processes.push(ProcessRecord {
            name: "survivor".into(),
            process: survivor,
        });
    })
    .unwrap();
    let sock = root.join(format!("{id}-outside.sock"));
    st.update(|s| s.sockets.push(sock.clone())).unwrap();
    let _listener = UnixListener::bind(&sock).unwrap();
    // Straight to fd 1: the test harness captures what `println!` writes.
    let mut out = std::io::stdout();
    writeln!(out, "ready {}", survivor.pid).unwrap();
    out.flush().unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// Not a test of its own: the owner process of `a_dead_owners_sandbox_is_cleaned_up`.
#[test]
#[ignore]
fn owner_process() {
    if let (Some(root), Some(id)) = (std::env::var_os(OWNER_ROOT), std::env::var(OWNER_ID).ok()) {
        be_the_owner(Path::new(&root), &id);
    }
}

/// Kills the owner if the test fails before it does.
struct Owner(std::process::Child);

impl Drop for Owner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_dead_owners_sandbox_is_cleaned_up() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "needs root (netns, tap, mount)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let root: PathBuf = tmp.path().to_path_buf();
    let id = "dead-owner";
    let mut owner = Owner(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "owner_process",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(OWNER_ROOT, &root)
            .env(OWNER_ID, id)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let survivor_pid: i32 = BufReader::new(owner.0.stdout.take().unwrap())
        .lines()
        .map(|l| l.unwrap())
        // libtest prints "test owner_process ... " before the test writes its line.
        .find_map(|l| {
            l.rsplit_once("ready ")
                .map(|(_, p)| p.trim().parse().unwrap())
        })
        .expect("the owner got ready");

    // A live sandbox next to it, owned by this process: not an orphan.
    let live = StateFile::create(&root, "live-owner").unwrap();

    let recorded = state::load(&root, id).unwrap();
    assert_eq!(recorded.owner.pid, owner.0.id() as i32);
    assert_eq!(recorded.processes.len(), 2);
    let dir = state::sandboxes_dir(&root).join(id);
    assert!(mounts().contains(dir.to_str().unwrap()));

    owner.0.kill().unwrap();
    owner.0.wait().unwrap();
    let survivor = recorded
        .processes
        .iter()
        .find(|p| p.name == "survivor")
        .unwrap()
        .process;
    assert_eq!(survivor.pid, survivor_pid);
    assert!(survivor.is_alive(), "the survivor outlived its owner");
    assert!(
        mounts().contains(dir.to_str().unwrap()),
        "the mounts outlived their owner"
    );

    // What the next `husk run` does: finds the dead owner's sandbox and cleans it up.
    state::sweep_orphans(&root);
    assert!(!survivor.is_alive(), "the survivor was killed");
    let owned = &recorded.processes[0].process;
    assert!(!owned.is_alive());
    assert!(
        !mounts().contains(dir.to_str().unwrap()),
        "mounts left: {}",
        mounts()
    );
    assert!(!dir.exists(), "the sandbox directory is gone");
    assert!(!recorded.sockets[0].exists(), "the socket is gone");
    assert!(live.dir().exists(), "a live owner's sandbox is left alone");
    // Cleaning up again (the shim's `delete` after a sweep) finds nothing to do.
    state::cleanup(&root, id).unwrap();
    state::cleanup(&root, "live-owner").unwrap();
    assert!(!live.dir().exists());
}
