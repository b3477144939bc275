//! The jailed VMM (`--jail`), as the VMM itself sees it and as a guest uses it: with
//! virtio-fs (whose watchdog thread must join the jail), vsock both ways (guest connections
//! only to sockets inside the jail), and a forbidden call that must still kill it.
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use husk_tests::vmm_proc::{self, VmmExitStatus};

use super::{connect_guest, spawn_virtiofsd, tmpdir, T};

/// An id from the sandbox layer's jail range (`husk_shim::sandbox::jail`).
const JAIL_ID: u32 = husk_shim::sandbox::jail::UID_BASE + 4242;

fn jailed(test: &str, d: &Path, sock: &Path) -> std::process::Command {
    let mut c = vmm_proc::command(test, "");
    c.arg("--fs-socket")
        .arg(format!("{},tag=husk_fs", sock.display()))
        .arg("--vsock-uds")
        .arg(d.join("jail/vsock.sock"))
        .arg("--jail")
        .arg(d.join("jail"))
        .args(["--uid", &JAIL_ID.to_string(), "--gid", &JAIL_ID.to_string()]);
    c
}

#[test]
fn a_jailed_vmm_sees_only_its_jail_and_dies_on_a_forbidden_call() {
    husk_tests::require_kvm();
    let d = tmpdir("jail-self");
    let share = d.join("share");
    std::fs::create_dir_all(&share).unwrap();
    let sock = d.join("vfs.sock");
    let mut vfsd = spawn_virtiofsd(&share, &sock);
    // A path that exists outside: the jailed VMM must not find it.
    let outside = d.join("outside-marker");
    std::fs::write(&outside, "x").unwrap();
    let child = jailed("boot", &d, &sock)
        .arg("--jail-selftest")
        .arg(&outside)
        .spawn()
        .unwrap();
    let o = vmm_proc::wait(child, T);
    let _ = vfsd.kill();
    let _ = vfsd.wait();
    let report = o
        .stderr
        .lines()
        .find_map(|l| {
            l.split_once("husk-vmm: jail-selftest {")
                .map(|(_, r)| format!("{{{r}"))
        })
        .unwrap_or_else(|| panic!("no jail report in the VMM log:\n{}", o.stderr));
    let r: serde_json::Value = serde_json::from_str(&report).expect("the report is JSON");
    assert_eq!(r["root"], serde_json::json!(["vsock.sock"]), "{report}");
    assert_eq!(r["outside_exists"], false, "{report}");
    assert_eq!(r["uid"], JAIL_ID, "{report}");
    assert_eq!(r["gid"], JAIL_ID, "{report}");
    assert_eq!(
        r["pid"], 1,
        "the VMM is PID 1 of its own namespace: {report}"
    );
    assert_eq!(r["hostname"], "husk-vmm", "{report}");
    assert_eq!(r["nofile"], 2048, "{report}");
    assert_eq!(r["fsize"], 64u64 << 20, "{report}");
    // The helper outside reports the VMM's death as its own.
    assert_eq!(
        o.status,
        Some(VmmExitStatus::Signaled(libc::SIGSYS)),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr
            .contains(&format!("forbidden syscall {}", libc::SYS_socket)),
        "{}",
        o.stderr
    );
    assert!(
        !d.join("jail/vsock.sock").exists(),
        "the helper left the vsock socket behind"
    );
    std::fs::remove_dir_all(d).unwrap();
}

/// Each task of `pid`: (name, (dev, ino) of its root directory).
fn task_roots(pid: u32) -> Vec<(String, (u64, u64))> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the VMM's tasks")
        .map(|t| {
            let t = t.expect("a task").path();
            let comm = std::fs::read_to_string(t.join("comm")).expect("comm");
            let root = std::fs::metadata(t.join("root")).expect("the task's root");
            (comm.trim().to_string(), (root.dev(), root.ino()))
        })
        .collect()
}

#[test]
fn a_jailed_vmm_serves_vsock_both_ways_with_every_thread_inside() {
    husk_tests::require_kvm();
    let d = tmpdir("jail-run");
    let share = d.join("share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("hello.txt"), "hello from the host\n").unwrap();
    let sock = d.join("vfs.sock");
    let mut vfsd = spawn_virtiofsd(&share, &sock);
    let jail = d.join("jail");
    std::fs::create_dir_all(&jail).unwrap();
    let uds = jail.join("vsock.sock");
    // The guest's connection to host port 5000 reaches this socket, inside the jail, which
    // the jailed uid may connect to.
    let host_listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    std::os::unix::fs::chown(
        format!("{}_5000", uds.display()),
        Some(JAIL_ID),
        Some(JAIL_ID),
    )
    .unwrap();
    let server = std::thread::spawn(move || {
        let (mut c, _) = host_listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(c.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        c.write_all(b"hi guest\n").unwrap();
        line
    });
    let child = jailed("vsock", &d, &sock).spawn().unwrap();
    let s = connect_guest(&uds, 1024, Instant::now() + Duration::from_secs(120));
    // Up and serving: look at every thread of the VMM, the helper's only child.
    let helper = child.id();
    let kids = std::fs::read_to_string(format!("/proc/{helper}/task/{helper}/children"))
        .expect("the helper's children");
    let vmm: u32 = kids.trim().parse().expect("exactly one child: the VMM");
    let jail_root = std::fs::metadata(&jail).unwrap();
    let roots = task_roots(vmm);
    assert!(
        roots.iter().any(|(n, _)| n == "husk-fs-watch"),
        "no virtio-fs watchdog: {roots:?}"
    );
    for (name, root) in &roots {
        assert_eq!(
            *root,
            (jail_root.dev(), jail_root.ino()),
            "thread {name} is not rooted in the jail"
        );
    }
    let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {status}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(field("Uid:"), vec![JAIL_ID.to_string(); 4]);
    assert_eq!(field("CapEff:"), vec!["0000000000000000"]);
    assert_eq!(field("NSpid:").last(), Some(&"1"), "{status}");
    for ns in ["mnt", "pid", "ipc", "uts"] {
        assert_ne!(
            std::fs::read_link(format!("/proc/{vmm}/ns/{ns}")).unwrap(),
            std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(),
            "the VMM shares our {ns} namespace"
        );
    }
    let limits = std::fs::read_to_string(format!("/proc/{vmm}/limits")).unwrap();
    assert!(
        limits.lines().any(
            |l| l.starts_with("Max core file size") && l.split_whitespace().nth(4) == Some("0")
        ),
        "{limits}"
    );
    // The guest's echo over vsock, and its connection out, work jailed.
    let mut w = s.try_clone().unwrap();
    w.write_all(b"ping through the jail").unwrap();
    w.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    (&s).take(64).read_to_end(&mut got).unwrap();
    assert_eq!(got, b"ping through the jail");
    drop(s);
    let o = vmm_proc::wait(child, T);
    let _ = vfsd.kill();
    let _ = vfsd.wait();
    let v = o.assert_pass("vsock");
    assert!(v.contains("host-said=hi guest"), "{v}");
    assert_eq!(server.join().unwrap(), "hello from the guest\n");
    assert_eq!(o.status, Some(VmmExitStatus::GuestEnded), "{}", o.stderr);
    assert!(!uds.exists(), "the helper left the vsock socket behind");
    std::fs::remove_dir_all(d).unwrap();
}
