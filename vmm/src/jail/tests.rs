use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::process::{Command, Output};
use std::sync::mpsc;

use vmm_sys_util::tempdir::TempDir;

use super::*;

const CHILD_ENV: &str = "HUSK_JAIL_TEST_DIR";
const NOBODY: u32 = 65534;
const LIMITS: ResourceLimits = ResourceLimits {
    nofile: 100,
    fsize: 1 << 20,
};

fn spec(dir: &Path, uid: u32, gid: u32) -> JailSpec {
    JailSpec {
        dir: dir.to_owned(),
        uid,
        gid,
        limits: LIMITS,
    }
}

fn is_root() -> bool {
    // SAFETY: no side effects.
    unsafe { libc::geteuid() == 0 }
}

/// Runs the ignored test `name` alone in a fresh copy of this test binary, with the jail
/// directory in its environment (the child tests do nothing without it).
fn run_child(name: &str, dir: &Path) -> Output {
    let full = format!("jail::tests::{name}");
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            &full,
            "--exact",
            "--ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD_ENV, dir)
        .output()
        .unwrap();
    eprintln!(
        "child {name}: {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed: {:?}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("{full} ... ok")), "{stdout}");
    out
}

/// Runs `f` in a forked process and returns its verdict. The test harness runs each test
/// on its own thread, and `enter` rightly refuses a multi-threaded process; the fork has
/// only the forking thread. Called only in a re-executed child running this one test, so no
/// other thread holds a lock the fork could inherit.
fn in_fork(f: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh fds owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fork in a process whose other thread (the harness) is blocked waiting for us.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        drop(read_end);
        let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .unwrap_or_else(|_| Err("panicked".into()));
        let msg = match &verdict {
            Ok(()) => String::new(),
            Err(e) => e.clone(),
        };
        // SAFETY: write from a live buffer, then leave without running the harness's
        // exit path (atexit handlers, buffered output) a second time.
        unsafe {
            libc::write(write_end.as_raw_fd(), msg.as_ptr().cast(), msg.len());
            libc::_exit(i32::from(verdict.is_err()));
        }
    }
    drop(write_end);
    let mut msg = String::new();
    std::fs::File::from(read_end)
        .read_to_string(&mut msg)
        .unwrap();
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Ok(())
    } else {
        Err(format!("jailed child failed (status {status:#x}): {msg}"))
    }
}

fn entries(dir: &str) -> Result<Vec<String>, String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| format!("read_dir({dir}): {e}"))?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// What must hold inside the jail.
fn confined(expected_root: &[&str]) -> Result<(), String> {
    // SAFETY: id getters have no side effects.
    let ids = unsafe {
        (
            libc::getuid(),
            libc::geteuid(),
            libc::getgid(),
            libc::getegid(),
        )
    };
    if ids != (NOBODY, NOBODY, NOBODY, NOBODY) {
        return Err(format!("ids are {ids:?}"));
    }
    let root = entries("/")?;
    if root != expected_root {
        return Err(format!("/ holds {root:?}, expected {expected_root:?}"));
    }
    // ".." of the root is the root: no way up.
    if entries("/..")? != root {
        return Err("/.. differs from /".into());
    }
    // SAFETY: must fail; no side effects if it does.
    if unsafe { libc::setuid(0) } == 0 {
        return Err("setuid(0) succeeded".into());
    }
    if io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return Err(format!("setuid(0): {}", io::Error::last_os_error()));
    }
    // SAFETY: reads a flag.
    if unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) } != 1 {
        return Err("no_new_privs is not set".into());
    }
    match std::fs::write("/planted", "x") {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {}
        other => return Err(format!("writing to the jail root: {other:?}")),
    }
    if std::env::current_dir().map_err(|e| e.to_string())? != Path::new("/") {
        return Err("cwd is not /".into());
    }
    for (name, resource, want) in [
        ("nofile", libc::RLIMIT_NOFILE, LIMITS.nofile),
        ("fsize", libc::RLIMIT_FSIZE, LIMITS.fsize),
    ] {
        if limits::get(resource) != (want, want) {
            return Err(format!("{name} limit is {:?}", limits::get(resource)));
        }
    }
    let mut host = [0u8; 64];
    // SAFETY: gethostname writes at most `host.len()` bytes into our buffer.
    unsafe { libc::gethostname(host.as_mut_ptr().cast(), host.len()) };
    if !host.starts_with(JAIL_HOSTNAME) || host[JAIL_HOSTNAME.len()] != 0 {
        return Err(format!("host name is {:?}", String::from_utf8_lossy(&host)));
    }
    Ok(())
}

/// A thread that was started before the jail and joins it when asked, then answers what it
/// sees at `/`.
struct Helper {
    join: mpsc::SyncSender<(i32, i32)>,
    joined: mpsc::Receiver<Result<(), String>>,
    look: mpsc::SyncSender<()>,
    seen: mpsc::Receiver<Result<Vec<String>, String>>,
}

impl Helper {
    fn start() -> Helper {
        let (join, join_rx) = mpsc::sync_channel::<(i32, i32)>(0);
        let (joined_tx, joined) = mpsc::sync_channel(1);
        let (look, look_rx) = mpsc::sync_channel::<()>(0);
        let (seen_tx, seen) = mpsc::sync_channel(1);
        std::thread::spawn(move || {
            let (ns, root) = join_rx.recv().unwrap();
            // SAFETY: the jail keeps both fds open until we answer.
            let (ns, root) = unsafe { (BorrowedFd::borrow_raw(ns), BorrowedFd::borrow_raw(root)) };
            joined_tx
                .send(join_from_thread(ns, root).map_err(|e| e.to_string()))
                .unwrap();
            look_rx.recv().unwrap();
            seen_tx.send(entries("/")).unwrap();
        });
        Helper {
            join,
            joined,
            look,
            seen,
        }
    }
}

impl JoinJail for Helper {
    fn join(&self, mount_ns: BorrowedFd<'_>, root: BorrowedFd<'_>) -> Result<(), String> {
        self.join
            .send((mount_ns.as_raw_fd(), root.as_raw_fd()))
            .map_err(|e| e.to_string())?;
        self.joined.recv().map_err(|e| e.to_string())?
    }
}

#[test]
#[ignore = "runs in a child process, from jailed_process_is_confined"]
fn child_enter_jail() {
    let Some(dir) = std::env::var_os(CHILD_ENV).map(PathBuf::from) else {
        return;
    };
    in_fork(|| {
        enter(&spec(&dir.join("existing"), NOBODY, NOBODY), &[]).map_err(|e| e.to_string())?;
        confined(&["marker", "sub"])
    })
    .unwrap();
    in_fork(|| {
        enter(&spec(&dir.join("missing/jail"), NOBODY, NOBODY), &[]).map_err(|e| e.to_string())?;
        confined(&[])
    })
    .unwrap();
    // A thread started before the jail ends up inside it too, and unprivileged.
    in_fork(|| {
        let helper = Helper::start();
        enter(&spec(&dir.join("existing"), NOBODY, NOBODY), &[&helper])
            .map_err(|e| e.to_string())?;
        confined(&["marker", "sub"])?;
        helper.look.send(()).map_err(|e| e.to_string())?;
        let seen = helper.seen.recv().map_err(|e| e.to_string())??;
        if seen != ["marker", "sub"] {
            return Err(format!("the helper thread sees {seen:?} at /"));
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn jailed_process_is_confined() {
    // Never a silent pass: a jail is only entered as root.
    assert!(
        is_root(),
        "entering a jail needs root: run as root, or deselect with --skip jailed_process_is_confined"
    );
    let tmp = TempDir::new_with_prefix("/tmp/husk-jail-").unwrap();
    let existing = tmp.as_path().join("existing");
    std::fs::create_dir(&existing).unwrap();
    std::fs::write(existing.join("marker"), "x").unwrap();
    std::fs::create_dir(existing.join("sub")).unwrap();
    // The jailed user reads them: modes set here, not left to the umask, which another
    // test thread may hold narrowed for a moment (listener::bind_owner_only).
    for (p, mode) in [("", 0o755), ("marker", 0o644), ("sub", 0o755)] {
        let perms = std::os::unix::fs::PermissionsExt::from_mode(mode);
        std::fs::set_permissions(existing.join(p), perms).unwrap();
    }

    run_child("child_enter_jail", tmp.as_path());

    // The missing directory was created, and the jails' mounts stayed in their namespaces.
    assert!(tmp.as_path().join("missing/jail").is_dir());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(tmp.as_path().to_str().unwrap()),
        "{mounts}"
    );
}

#[test]
fn refuses_root_target_and_threads() {
    let tmp = TempDir::new_with_prefix("/tmp/husk-jail-").unwrap();
    let dir = tmp.as_path().join("never");
    if is_root() {
        assert!(matches!(
            enter(&spec(&dir, 0, NOBODY), &[]),
            Err(JailError::RootTarget { .. })
        ));
        assert!(matches!(
            enter(&spec(&dir, NOBODY, 0), &[]),
            Err(JailError::RootTarget { .. })
        ));
        // The harness runs tests on their own threads, so this process has several.
        let err = enter(&spec(&dir, NOBODY, NOBODY), &[]).unwrap_err();
        assert!(
            matches!(err, JailError::MultiThreaded { threads, helpers: 0 } if threads > 1),
            "{err}"
        );
    } else {
        assert!(matches!(
            enter(&spec(&dir, NOBODY, NOBODY), &[]),
            Err(JailError::NotRoot(_))
        ));
    }
    // Refused before touching anything.
    assert!(!dir.exists());
}
