//! Collects the exit status of every child: the runtime helpers, the container processes
//! (which are re-parented to us since we are a subreaper or PID 1), and any orphan.
//!
//! One task owns `waitpid(-1)`. Anyone interested in a pid asks [`Reaper::watch`] for it; an
//! exit that nobody has asked for yet is kept (bounded), because a process may exit before
//! the code that started it learned its pid.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitInfo {
    /// Shell-style status: the exit code, or 128 + signal.
    pub status: i32,
    /// The killing signal; 0 when the process exited by itself.
    pub signal: i32,
    /// When we reaped it.
    pub at: SystemTime,
}

impl ExitInfo {
    fn from_wait(ws: WaitStatus) -> Option<(i32, ExitInfo)> {
        let at = SystemTime::now();
        match ws {
            WaitStatus::Exited(pid, code) => Some((
                pid.as_raw(),
                ExitInfo {
                    status: code,
                    signal: 0,
                    at,
                },
            )),
            WaitStatus::Signaled(pid, sig, _) => Some((
                pid.as_raw(),
                ExitInfo {
                    status: 128 + sig as i32,
                    signal: sig as i32,
                    at,
                },
            )),
            _ => None,
        }
    }
}

/// Unclaimed exits kept at most (orphans reaped as PID 1 are never claimed).
const MAX_UNCLAIMED: usize = 4096;
/// An unclaimed exit older than this is an orphan's, not that of a process whose starter is
/// about to ask: forgetting it keeps a reused pid from inheriting a stale status.
const UNCLAIMED_TTL: Duration = Duration::from_secs(30);

fn fresh(info: &ExitInfo) -> bool {
    info.at
        .elapsed()
        .map(|age| age < UNCLAIMED_TTL)
        .unwrap_or(true)
}

#[derive(Default)]
struct Inner {
    waiters: HashMap<i32, oneshot::Sender<ExitInfo>>,
    unclaimed: HashMap<i32, ExitInfo>,
}

/// The process-wide child reaper.
#[derive(Default)]
pub struct Reaper {
    inner: Mutex<Inner>,
}

impl Reaper {
    /// Starts reaping on SIGCHLD (and every second, in case a signal was coalesced away).
    /// Must be called inside a tokio runtime.
    pub fn start() -> std::io::Result<Arc<Reaper>> {
        let reaper = Arc::new(Reaper::default());
        let mut sigchld = signal(SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = sigchld.recv() => {}
                    _ = tick.tick() => {}
                }
                r.reap_all();
            }
        });
        Ok(reaper)
    }

    /// Returns a receiver that gets `pid`'s exit (at once if it already happened).
    pub fn watch(&self, pid: i32) -> oneshot::Receiver<ExitInfo> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.inner.lock().expect("reaper lock");
        match inner.unclaimed.remove(&pid) {
            Some(info) if fresh(&info) => {
                let _ = tx.send(info);
            }
            _ => {
                inner.waiters.insert(pid, tx);
            }
        }
        rx
    }

    /// Reaps every child that has exited and hands each status to its watcher.
    pub fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(ws) => {
                    if let Some((pid, info)) = ExitInfo::from_wait(ws) {
                        self.deliver(pid, info);
                    }
                }
                // ECHILD: no children at all; anything else: nothing more we can do now.
                Err(_) => break,
            }
        }
    }

    fn deliver(&self, pid: i32, info: ExitInfo) {
        let mut inner = self.inner.lock().expect("reaper lock");
        if let Some(tx) = inner.waiters.remove(&pid) {
            tracing::debug!(pid, status = info.status, "child exited");
            let _ = tx.send(info);
        } else {
            if inner.unclaimed.len() >= MAX_UNCLAIMED {
                // Orphans nobody will ever ask about: drop the stale ones, or any one.
                inner.unclaimed.retain(|_, i| fresh(i));
                if inner.unclaimed.len() >= MAX_UNCLAIMED {
                    if let Some(k) = inner.unclaimed.keys().next().copied() {
                        inner.unclaimed.remove(&k);
                    }
                }
            }
            inner.unclaimed.insert(pid, info);
        }
    }
}
