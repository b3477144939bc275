//! `husk-pause`: the pause container of the containerd tests' pod sandboxes. It waits for
//! SIGTERM or SIGINT and exits 0, like Kubernetes' pause; it reaps zombies meanwhile, because
//! with a shared PID namespace it is PID 1 of the pod.
//!
//! Only `std` and glibc's signal calls: the harness compiles this one file with `rustc` and
//! `-C target-feature=+crt-static` into an image whose root holds nothing else, so it cannot
//! depend on a crate (and a nested `cargo build` would wait on the test's own build lock).

use std::os::raw::c_int;

/// glibc's `sigset_t` is 1024 bits.
#[repr(C)]
struct SigSet([u64; 16]);

const SIGINT: c_int = 2;
const SIGTERM: c_int = 15;
const SIGCHLD: c_int = 17;
const SIG_BLOCK: c_int = 0;
const WNOHANG: c_int = 1;

extern "C" {
    fn sigemptyset(set: *mut SigSet) -> c_int;
    fn sigaddset(set: *mut SigSet, sig: c_int) -> c_int;
    fn sigprocmask(how: c_int, set: *const SigSet, old: *mut SigSet) -> c_int;
    fn sigwait(set: *const SigSet, sig: *mut c_int) -> c_int;
    fn waitpid(pid: c_int, status: *mut c_int, options: c_int) -> c_int;
}

fn main() {
    let mut set = SigSet([0; 16]);
    // SAFETY: plain libc calls on a sigset_t-sized buffer we own.
    unsafe {
        sigemptyset(&mut set);
        for sig in [SIGINT, SIGTERM, SIGCHLD] {
            sigaddset(&mut set, sig);
        }
        // Blocked, so they queue for sigwait instead of taking their default action (PID 1
        // ignores unhandled SIGTERM, so the default would never end us anyway).
        if sigprocmask(SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            eprintln!("husk-pause: sigprocmask failed");
            std::process::exit(1);
        }
    }
    loop {
        let mut sig: c_int = 0;
        // SAFETY: as above.
        let rc = unsafe { sigwait(&set, &mut sig) };
        if rc != 0 {
            continue;
        }
        match sig {
            SIGINT | SIGTERM => std::process::exit(0),
            _ => {
                let mut status = 0;
                // SAFETY: reaping any exited child; no memory is shared.
                while unsafe { waitpid(-1, &mut status, WNOHANG) } > 0 {}
            }
        }
    }
}
