//! Can a VMM be jailed here (`husk-vmm --jail`)? `husk check` reports it, and the sandbox
//! layer refuses to start a jailed VMM where it cannot be, with this reason.

/// What the jail needs that this host may not give, tried for real: root, and new mount,
/// PID, IPC and UTS namespaces made by a short-lived child (a container runtime's own
/// seccomp profile or a user namespace without the capability can refuse them).
pub fn check_jail() -> Result<(), String> {
    // SAFETY: geteuid has no side effects.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(format!(
            "jailing the VMM needs root (this runs as uid {euid}); run as root, or set [vm] jail = false in husk.toml"
        ));
    }
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    // SAFETY: the child only calls unshare and _exit (async-signal-safe), so forking a
    // multi-threaded caller is fine; the parent reaps it below.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!(
            "cannot fork to try the jail's namespaces: {}",
            std::io::Error::last_os_error()
        ));
    }
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            let code = if libc::unshare(flags) == 0 {
                0
            } else {
                *libc::__errno_location()
            };
            libc::_exit(code);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("cannot wait for the namespace probe: {e}"));
        }
    }
    match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
        (true, 0) => Ok(()),
        (true, errno) => Err(format!(
            "new mount, PID, IPC and UTS namespaces are refused here ({}); set [vm] jail = false in husk.toml to run VMMs unjailed",
            std::io::Error::from_raw_os_error(errno)
        )),
        _ => Err(format!("the namespace probe ended abnormally (status {status:#x})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe gives the answer this process can check by itself: root here can make
    /// namespaces (the jail tests need that too); anyone else gets the root message.
    #[test]
    fn the_probe_answers_for_this_host() {
        // SAFETY: no side effects.
        let root = unsafe { libc::geteuid() } == 0;
        match check_jail() {
            Ok(()) => assert!(root, "only root may jail"),
            Err(e) if root => panic!("root cannot make the jail's namespaces here: {e}"),
            Err(e) => assert!(e.contains("needs root"), "{e}"),
        }
    }
}
