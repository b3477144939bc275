//! Every thread of a running VMM is under a seccomp filter: main, vCPUs, the disk's I/O
//! thread and virtio-fs's worker and watchdog (the kernel's own view, `/proc/<pid>/task/*/status`).
use std::io::{BufRead, BufReader, Read};

use super::tmpdir;

/// (thread name, `Seccomp:` mode) of each thread of `pid`; 2 is "filter".
fn thread_modes(pid: u32) -> Vec<(String, String)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the VMM's tasks");
    tasks
        .map(|t| {
            let t = t.expect("a task").path();
            let comm = std::fs::read_to_string(t.join("comm")).expect("comm");
            let status = std::fs::read_to_string(t.join("status")).expect("status");
            let mode = status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .expect("a Seccomp: line (kernel without CONFIG_SECCOMP?)")
                .trim()
                .to_string();
            (comm.trim().to_string(), mode)
        })
        .collect()
}

#[test]
fn every_vmm_thread_runs_under_seccomp() {
    husk_tests::require_kvm();
    let d = tmpdir("threads");
    let (sock, mut vfsd) = super::shared_dir(&d);
    let disk = d.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    let mut child = husk_tests::vmm_proc::command("hold", "")
        .arg("--block")
        .arg(&disk)
        .arg("--fs-socket")
        .arg(format!("{},tag=husk_fs", sock.display()))
        .arg("--vsock-uds")
        .arg(d.join("vsock.sock"))
        .spawn()
        .unwrap();
    // The guest holds the VM up for a few seconds once its userspace runs.
    let stdout = child.stdout.take().unwrap();
    let up = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("userspace reached"));
    let modes = thread_modes(child.id());
    let _ = child.kill();
    let mut log = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut log);
    child.wait().unwrap();
    let _ = vfsd.kill();
    let _ = vfsd.wait();
    assert!(up, "the guest never reached userspace: {log}");
    let names: Vec<&str> = modes.iter().map(|(n, _)| n.as_str()).collect();
    for expected in ["husk-blk0", "husk-fs-watch", "husk-fs-vhost"] {
        assert!(names.contains(&expected), "no {expected} thread: {names:?}");
    }
    let unfiltered: Vec<_> = modes.iter().filter(|(_, m)| m != "2").collect();
    assert!(
        unfiltered.is_empty(),
        "threads without a seccomp filter: {unfiltered:?}"
    );
    std::fs::remove_dir_all(d).unwrap();
}
