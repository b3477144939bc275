//! Bounds each vhost-user exchange with virtiofsd in time.
//!
//! vhost's `Frontend` blocks in `recvmsg` until virtiofsd answers, and it retries a read that
//! fails with `EAGAIN`, so a socket receive timeout would not bound a back end that is alive but
//! silent (a hung virtiofsd, or a listener that never accepts). Shutting the socket down does:
//! the pending read then sees end-of-file and the request fails. The watchdog thread is started
//! once, in `Fs::new` (on the VMM's main thread, before any seccomp filter), because `activate`
//! runs on a vCPU thread that may not be allowed to create threads.

use std::net::Shutdown;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender, SyncSender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

enum Command {
    Arm {
        deadline: Instant,
        what: &'static str,
    },
    Disarm,
    /// Install the watchdog's seccomp filter on the thread, and say how that went.
    Confine(SyncSender<Result<(), String>>),
    /// Join the VMM's jail: its mount namespace and root (raw fds, open until the reply).
    JoinJail {
        mount_ns: RawFd,
        root: RawFd,
        reply: SyncSender<Result<(), String>>,
    },
}

pub(super) struct Watchdog {
    tx: Option<Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    fired: Arc<AtomicBool>,
}

impl Watchdog {
    /// Starts the watchdog thread; `sock` is a handle on the vhost-user socket to shut down.
    pub(super) fn start(sock: UnixStream) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Command>();
        let fired = Arc::new(AtomicBool::new(false));
        let thread_fired = Arc::clone(&fired);
        let thread = thread::Builder::new()
            .name("husk-fs-watch".into())
            .spawn(move || {
                let mut armed: Option<(Instant, &'static str)> = None;
                loop {
                    let cmd = match armed {
                        None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                        Some((deadline, _)) => {
                            rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                        }
                    };
                    match cmd {
                        Ok(Command::Arm { deadline, what }) => armed = Some((deadline, what)),
                        Ok(Command::Disarm) => armed = None,
                        Ok(Command::JoinJail {
                            mount_ns,
                            root,
                            reply,
                        }) => {
                            // SAFETY: the jail holds both fds open until it has our reply.
                            let (ns, root) = unsafe {
                                (
                                    BorrowedFd::borrow_raw(mount_ns),
                                    BorrowedFd::borrow_raw(root),
                                )
                            };
                            let r = crate::jail::join_from_thread(ns, root)
                                .map_err(|e| format!("the virtio-fs watchdog: {e}"));
                            let _ = reply.send(r);
                        }
                        Ok(Command::Confine(reply)) => {
                            let r = crate::seccomp::install(crate::seccomp::ThreadKind::Watchdog)
                                .map_err(|e| e.to_string());
                            let _ = reply.send(r);
                        }
                        Err(RecvTimeoutError::Timeout) => {
                            let what = armed.take().map_or("?", |(_, what)| what);
                            tracing::error!(
                                "virtio-fs: virtiofsd did not answer ({what}) in time; \
                                 closing the vhost-user connection"
                            );
                            thread_fired.store(true, Ordering::SeqCst);
                            // Makes the blocked read in the vhost-user frontend return
                            // end-of-file, which fails the request instead of hanging.
                            let _ = sock.shutdown(Shutdown::Both);
                        }
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            })?;
        Ok(Watchdog {
            tx: Some(tx),
            thread: Some(thread),
            fired,
        })
    }

    /// Shuts the socket down unless the returned guard is dropped within `limit`.
    pub(super) fn arm(&self, limit: Duration, what: &'static str) -> Armed<'_> {
        self.send(Command::Arm {
            deadline: Instant::now() + limit,
            what,
        });
        Armed(self)
    }

    /// A way to put the watchdog thread under its seccomp filter later (at VM start, when the
    /// VMM's threads are confined; not at creation, so unit tests stay unfiltered).
    pub(super) fn confiner(&self) -> Confiner {
        Confiner(self.tx.clone())
    }

    fn send(&self, cmd: Command) {
        if let Some(tx) = &self.tx {
            // Fails only if the thread is gone, and then nothing is left to disarm.
            let _ = tx.send(cmd);
        }
    }

    /// Whether the watchdog ever had to shut the connection down.
    pub(super) fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

/// Disarms the watchdog when the exchange it guards is over.
pub(super) struct Armed<'a>(&'a Watchdog);

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.0.send(Command::Disarm);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Dropping the sender ends the thread's loop; join it so its socket handle is closed
        // before the device is gone (virtiofsd sees the hang-up only once every copy is closed).
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Confines a watchdog thread (see [`Watchdog::confiner`]): into the jail, under its filter.
pub struct Confiner(Option<Sender<Command>>);

impl crate::jail::JoinJail for Confiner {
    fn join(&self, mount_ns: BorrowedFd<'_>, root: BorrowedFd<'_>) -> Result<(), String> {
        let (reply, done) = mpsc::sync_channel(1);
        let tx = self.0.as_ref().ok_or("the watchdog has no thread")?;
        tx.send(Command::JoinJail {
            mount_ns: mount_ns.as_raw_fd(),
            root: root.as_raw_fd(),
            reply,
        })
        .map_err(|_| "the watchdog thread is gone".to_string())?;
        done.recv()
            .map_err(|_| "the watchdog thread ended before joining the jail".to_string())?
    }
}

impl Confiner {
    /// Installs the filter on the watchdog's thread; returns once it is in force.
    pub fn confine(&self) -> Result<(), String> {
        let (reply, done) = mpsc::sync_channel(1);
        let tx = self.0.as_ref().ok_or("the watchdog has no thread")?;
        tx.send(Command::Confine(reply))
            .map_err(|_| "the watchdog thread is gone".to_string())?;
        done.recv()
            .map_err(|_| "the watchdog thread ended before confining itself".to_string())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Under its filter, the watchdog still does its one job: it fires and shuts the socket.
    #[test]
    fn a_confined_watchdog_still_fires() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let dog = Watchdog::start(ours).unwrap();
        dog.confiner().confine().expect("confine the watchdog");
        let _armed = dog.arm(Duration::from_millis(50), "test");
        theirs
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 1];
        // End-of-file once the watchdog shut the connection down.
        assert_eq!(theirs.read(&mut buf).unwrap(), 0);
        assert!(dog.fired());
    }
}
