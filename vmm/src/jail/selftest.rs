//! A test hook (`husk-vmm --jail-selftest PATH`, hidden): what the VMM itself sees once it is
//! jailed, reported from inside, then a forbidden call. It exists so a test can look at the
//! jail from the one place that matters, the jailed process, instead of trusting the set-up
//! code; it does nothing but read and then kill the VMM, so it cannot weaken the jail.

use std::path::Path;

/// Reads what the jailed process can see and prints it as one line on stderr:
/// `husk-vmm: jail-selftest {json}`. Runs after the jail is entered, before any seccomp
/// filter (listing a directory needs `openat` and `getdents64`, which the filters forbid).
pub fn report_inside(outside: &Path) {
    let mut root: Vec<String> = std::fs::read_dir("/")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    root.sort();
    let mut host = [0u8; 65];
    // SAFETY: gethostname writes at most 64 bytes into our 65-byte buffer.
    unsafe { libc::gethostname(host.as_mut_ptr().cast(), 64) };
    let host_len = host.iter().position(|&b| b == 0).unwrap_or(64);
    let limit = |resource| {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass.
        unsafe { libc::getrlimit(resource, &mut l) };
        l.rlim_max
    };
    // SAFETY: id getters have no side effects.
    let (uid, gid, pid) = unsafe { (libc::getuid(), libc::getgid(), libc::getpid()) };
    let report = serde_json::json!({
        "root": root,
        "outside_exists": outside.exists(),
        "uid": uid,
        "gid": gid,
        "pid": pid,
        "hostname": String::from_utf8_lossy(&host[..host_len]),
        "nofile": limit(libc::RLIMIT_NOFILE),
        "fsize": limit(libc::RLIMIT_FSIZE),
    });
    eprintln!("husk-vmm: jail-selftest {report}");
}

/// Tries to open a network socket, which every filter forbids: the VMM must die by SIGSYS
/// here, with the seccomp report on stderr. Runs once every thread is filtered.
pub fn forbidden_call() {
    eprintln!("husk-vmm: jail-selftest: opening a TCP socket");
    // SAFETY: socket(2) with constant arguments; seccomp stops it before it runs.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    eprintln!("husk-vmm: jail-selftest: socket(AF_INET) returned {fd}: the filter let it through");
}
