//! The host processes a sandbox owns (husk-vmm, virtiofsd), held by pidfd.
//!
//! Their `PR_SET_PDEATHSIG` fires when the *thread* that forked them exits, not the process.
//! So they are forked by one spawner thread that lives as long as this process: they die
//! with it (a SIGKILLed `husk` or shim takes its VMs along), and never because a tokio
//! blocking thread went idle. Everything else goes through a pidfd, which cannot name a
//! recycled pid: exit readiness (poll, or tokio's `AsyncFd` on async threads), reaping
//! (`waitid(P_PIDFD)`), and kill (`pidfd_send_signal`).

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// `P_PIDFD` for `waitid` (Linux 5.4).
const P_PIDFD: libc::idtype_t = 3;

/// A process named so that a recycled pid does not match: its pid and its start time (clock
/// ticks after boot, `/proc/<pid>/stat` field 22).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    pub pid: i32,
    pub start_time: u64,
}

impl ProcessRef {
    /// The process that has `pid` now; `None` if there is none.
    pub fn of(pid: i32) -> Option<ProcessRef> {
        stat(pid).map(|(_, start_time)| ProcessRef { pid, start_time })
    }

    pub fn current() -> ProcessRef {
        ProcessRef::of(std::process::id() as i32).expect("/proc/self/stat is readable")
    }

    /// Whether this very process still runs (a zombie has ended: it only waits to be reaped,
    /// by a parent that may not be ours).
    pub fn is_alive(&self) -> bool {
        stat(self.pid).is_some_and(|(state, start)| start == self.start_time && state != 'Z')
    }

    /// A pidfd for this process, or `None` if it is gone (or its pid now names another one).
    pub fn open(&self) -> io::Result<Option<PidFd>> {
        let fd = match PidFd::open(self.pid) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
            Err(e) => return Err(e),
        };
        // Checked after opening: from now on the pidfd pins this process, so if the start
        // time matches, the pidfd is the process we recorded.
        let same = ProcessRef::of(self.pid).is_some_and(|now| now == *self);
        Ok(same.then_some(fd))
    }
}

/// A process's state letter and start time (clock ticks after boot), from `/proc/<pid>/stat`.
fn stat(pid: i32) -> Option<(char, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let mut fields = stat.rsplit_once(") ")?.1.split_whitespace();
    // Field 3 is the state, field 22 the start time.
    let state = fields.next()?.chars().next()?;
    let start_time = fields.nth(18)?.parse().ok()?;
    Some((state, start_time))
}

/// A pidfd: exit readiness and signals for one process, immune to pid reuse.
#[derive(Debug)]
pub struct PidFd(OwnedFd);

impl PidFd {
    pub fn open(pid: i32) -> io::Result<PidFd> {
        // SAFETY: pidfd_open takes a pid and flags by value; the result is checked and owned.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(PidFd(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }))
    }

    /// Sends `signal`; a process that already exited is not an error.
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: pidfd_send_signal with a null siginfo reads no memory of ours.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Blocks until the process exits or `timeout` passes; true if it exited.
    pub fn wait_exit(&self, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd, alive for the call.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            match n {
                n if n > 0 => return Ok(true),
                0 => return Ok(false),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Resolves once the process has exited, without blocking the runtime.
    pub async fn exited(&self) -> io::Result<()> {
        // SAFETY: the AsyncFd owns the duplicate, an open pidfd, and never replaces it.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                self.0.try_clone()?,
                tokio::io::Interest::READABLE,
            )
        }
        .map_err(io::Error::from)?;
        let _ready = fd.readable().await?;
        Ok(())
    }

    /// Reaps our child without blocking: its status, or `None` while it runs.
    fn try_reap(&self) -> io::Result<Option<ExitStatus>> {
        // SAFETY: siginfo_t is plain data; all-zero is valid and means "no child changed".
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes one siginfo_t into `info`, alive for the call.
        let ret = unsafe {
            libc::waitid(
                P_PIDFD,
                self.0.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: waitid filled `info` for a child (or left it zeroed: si_pid 0).
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        // Back to a wait(2) status word, which is what ExitStatus wraps.
        let raw = match info.si_code {
            libc::CLD_EXITED => (status & 0xff) << 8,
            libc::CLD_DUMPED => status | 0x80,
            _ => status,
        };
        Ok(Some(ExitStatus::from_raw(raw)))
    }
}

type SpawnJob = (Command, mpsc::Sender<io::Result<Child>>);

/// The thread that forks every child, so their parent-death signal is tied to this
/// process's life (the thread never exits), not to whichever thread asked.
fn spawner() -> &'static Mutex<mpsc::Sender<SpawnJob>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("husk-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the process spawner thread");
        Mutex::new(tx)
    })
}

/// A child process we spawned and own: killed and reaped when dropped.
#[derive(Debug)]
pub struct ChildProcess {
    name: &'static str,
    process: ProcessRef,
    pidfd: PidFd,
    status: Mutex<Option<ExitStatus>>,
}

impl ChildProcess {
    /// Spawns `cmd` from the spawner thread, with SIGKILL as its parent-death signal.
    pub fn spawn(name: &'static str, mut cmd: Command) -> io::Result<ChildProcess> {
        // SAFETY: the closure runs in the forked child before exec and only calls prctl,
        // which is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (tx, rx) = mpsc::channel();
        spawner()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((cmd, tx))
            .map_err(|_| io::Error::other("the process spawner thread is gone"))?;
        let child = rx
            .recv()
            .map_err(|_| io::Error::other("the process spawner thread is gone"))??;
        let pid = child.id() as i32;
        // Not reaped yet (nobody waits on it but us), so the pid is still this child's.
        let pidfd = PidFd::open(pid)?;
        let process = ProcessRef::of(pid).unwrap_or(ProcessRef { pid, start_time: 0 });
        // `Child` neither kills nor reaps on drop; the pidfd owns the process from here.
        drop(child);
        Ok(ChildProcess {
            name,
            process,
            pidfd,
            status: Mutex::new(None),
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn pid(&self) -> i32 {
        self.process.pid
    }

    pub fn process_ref(&self) -> ProcessRef {
        self.process
    }

    /// Its exit status once it has exited (reaping it), `None` while it runs.
    pub fn try_status(&self) -> Option<ExitStatus> {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if status.is_none() {
            match self.pidfd.try_reap() {
                Ok(s) => *status = s,
                Err(e) => tracing::warn!("waitid on {} [{}]: {e}", self.name, self.pid()),
            }
        }
        *status
    }

    /// Blocks up to `timeout` for it to exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.try_status() {
            return Some(s);
        }
        match self.pidfd.wait_exit(timeout) {
            Ok(true) => self.try_status(),
            Ok(false) => None,
            Err(e) => {
                tracing::warn!("poll on {} [{}]: {e}", self.name, self.pid());
                None
            }
        }
    }

    /// Waits for it to exit on an async thread, without blocking it.
    pub async fn wait(&self) -> io::Result<ExitStatus> {
        loop {
            if let Some(s) = self.try_status() {
                return Ok(s);
            }
            self.pidfd.exited().await?;
        }
    }

    pub fn signal(&self, signal: i32) {
        if let Err(e) = self.pidfd.signal(signal) {
            tracing::warn!("signal {signal} to {} [{}]: {e}", self.name, self.pid());
        }
    }

    /// Gives it `grace` to exit on its own, then SIGKILLs it; reaps it either way.
    pub fn stop(&self, grace: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.wait_timeout(grace) {
            return Some(s);
        }
        self.signal(libc::SIGKILL);
        // A SIGKILLed process exits at once unless stuck in the kernel (D state).
        let s = self.wait_timeout(Duration::from_secs(5));
        if s.is_none() {
            tracing::warn!("{} [{}] survives SIGKILL", self.name, self.pid());
        }
        s
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}

/// SIGKILLs the process `p` names (if it still does) and waits up to `timeout` for it to go.
/// For processes of another (dead) owner: we cannot reap them, only see them exit.
pub fn kill_and_wait(p: &ProcessRef, timeout: Duration) -> io::Result<bool> {
    let Some(fd) = p.open()? else {
        return Ok(true);
    };
    fd.signal(libc::SIGKILL)?;
    fd.wait_exit(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper() -> ChildProcess {
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        ChildProcess::spawn("sleep", cmd).unwrap()
    }

    #[test]
    fn process_refs_tell_reused_pids_apart() {
        let me = ProcessRef::current();
        assert!(me.is_alive());
        let older = ProcessRef {
            start_time: me.start_time.wrapping_sub(1),
            ..me
        };
        assert!(!older.is_alive(), "same pid, other start time");
        assert!(older.open().unwrap().is_none());
        assert!(me.open().unwrap().is_some());
    }

    #[test]
    fn exit_statuses_come_back_through_the_pidfd() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "exit 3"]);
        let p = ChildProcess::spawn("sh", cmd).unwrap();
        let st = p.wait_timeout(Duration::from_secs(10)).expect("exited");
        assert_eq!(st.code(), Some(3));
        assert_eq!(p.try_status(), Some(st), "the status is kept once reaped");

        let p = sleeper();
        assert_eq!(p.wait_timeout(Duration::from_millis(50)), None);
        let st = p.stop(Duration::ZERO).expect("killed");
        assert_eq!(st.signal(), Some(libc::SIGKILL));
        assert!(!p.process_ref().is_alive(), "reaped");
    }

    /// The parent-death signal is tied to the spawner thread, not the caller's: a child
    /// spawned from a short-lived thread outlives that thread.
    #[test]
    fn children_outlive_the_thread_that_asked_for_them() {
        let p = std::thread::spawn(sleeper).join().unwrap();
        assert_eq!(
            p.wait_timeout(Duration::from_millis(300)),
            None,
            "still running"
        );
        let pid = p.pid();
        drop(p);
        assert!(ProcessRef::of(pid).is_none(), "drop kills and reaps");
    }

    #[test]
    fn async_wait_sees_the_exit() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let p = sleeper();
        let pid = p.pid();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            // SAFETY: kill(2) takes no pointers.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        });
        let st = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), p.wait()).await })
            .expect("the async wait returned")
            .unwrap();
        assert_eq!(st.signal(), Some(libc::SIGTERM));
    }

    #[test]
    fn foreign_processes_are_killed_by_ref() {
        let mut child = Command::new("sleep").arg("600").spawn().unwrap();
        let r = ProcessRef::of(child.id() as i32).unwrap();
        let stale = ProcessRef {
            start_time: r.start_time + 1,
            ..r
        };
        assert!(
            kill_and_wait(&stale, Duration::ZERO).unwrap(),
            "not ours to kill"
        );
        assert_eq!(child.try_wait().unwrap(), None, "left alone");
        // A zombie still counts as exited for the pidfd.
        assert!(kill_and_wait(&r, Duration::from_secs(5)).unwrap());
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    }
}
