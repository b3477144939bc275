//! Bounds each vhost-user exchange with virtiofsd in time.
//!
//! vhost's `Frontend` blocks in `recvmsg` until virtiofsd answers, and it retries a read that
//! fails with `EAGAIN`, so a socket receive timeout would not bound a back end that is alive but
//! silent (a hung virtiofsd, or a listener that never accepts). Shutting the socket down does:
//! the pending read then sees end-of-file and the request fails. The watchdog thread is started
//! once, in `Fs::new` (on the VMM's main thread, before any seccomp filter or jail), and
//! guards the handshake there and then the exchanges of the vhost-user worker (`backend`).

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::devices::helper_thread::{Control, HelperThread};
use crate::seccomp::ThreadKind;

enum Command {
    Arm {
        deadline: Instant,
        what: &'static str,
    },
    Disarm,
    /// A request from the controller (jail, seccomp).
    Control(Control),
    /// End the thread (the controller's handles hold senders too, so the channel alone
    /// would not close).
    Stop,
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
            .stack_size(crate::THREAD_STACK_SIZE)
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
                        Ok(Command::Control(c)) => c.run("the virtio-fs watchdog"),
                        Ok(Command::Stop) => return,
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

    /// The controller's handle on the thread, to jail and filter it once the VM starts (not
    /// at creation, so unit tests stay unfiltered).
    pub(super) fn helper(&self) -> Option<HelperThread> {
        let tx = self.tx.clone()?;
        Some(HelperThread::new(
            "virtio-fs watchdog",
            ThreadKind::Watchdog,
            tx,
            Command::Control,
        ))
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
        // Stop ends the thread's loop; join it so its socket handle is closed before the
        // device is gone (virtiofsd sees the hang-up only once every copy is closed).
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Command::Stop);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
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
        dog.helper()
            .unwrap()
            .confine()
            .expect("confine the watchdog");
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
