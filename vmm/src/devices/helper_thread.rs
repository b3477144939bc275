//! Threads a device starts while the VM is built (virtio-fs's vhost-user worker and its
//! watchdog), before the jail and the seccomp filters exist. Each must end up jailed and
//! filtered like the VMM's own threads, and only the thread itself can do that to itself: it
//! runs the [`Control`] requests its owner forwards from [`HelperThread`].

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::mpsc::{self, SyncSender};

use crate::seccomp::ThreadKind;

/// What the controller asks of a helper thread, run on that thread by [`Control::run`].
pub enum Control {
    /// Install `ThreadKind`'s seccomp filter, and say how that went.
    Confine(ThreadKind, SyncSender<Result<(), String>>),
    /// Join the VMM's jail: its mount namespace and root (raw fds, open until the reply).
    JoinJail {
        mount_ns: RawFd,
        root: RawFd,
        reply: SyncSender<Result<(), String>>,
    },
}

impl Control {
    /// Does what was asked, on the calling thread, and answers.
    pub fn run(self, thread: &str) {
        match self {
            Control::Confine(kind, reply) => {
                let r = crate::seccomp::install(kind).map_err(|e| format!("{thread}: {e}"));
                let _ = reply.send(r);
            }
            Control::JoinJail {
                mount_ns,
                root,
                reply,
            } => {
                // SAFETY: the jail holds both fds open until it has our reply.
                let (ns, root) = unsafe {
                    (
                        BorrowedFd::borrow_raw(mount_ns),
                        BorrowedFd::borrow_raw(root),
                    )
                };
                let r =
                    crate::jail::join_from_thread(ns, root).map_err(|e| format!("{thread}: {e}"));
                let _ = reply.send(r);
            }
        }
    }
}

/// The controller's handle on one helper thread: forwards [`Control`] requests into the
/// thread's own channel and waits for the answer.
pub struct HelperThread {
    name: &'static str,
    kind: ThreadKind,
    send: Box<dyn Fn(Control) -> bool + Send>,
}

impl HelperThread {
    /// A handle on the thread `name` that reads its requests from `tx` (wrapped by `wrap`
    /// into its own message type) and gets `kind`'s filter.
    pub fn new<T: Send + 'static>(
        name: &'static str,
        kind: ThreadKind,
        tx: mpsc::Sender<T>,
        wrap: fn(Control) -> T,
    ) -> HelperThread {
        HelperThread {
            name,
            kind,
            send: Box::new(move |c| tx.send(wrap(c)).is_ok()),
        }
    }

    fn ask(
        &self,
        make: impl FnOnce(SyncSender<Result<(), String>>) -> Control,
    ) -> Result<(), String> {
        let (reply, done) = mpsc::sync_channel(1);
        if !(self.send)(make(reply)) {
            return Err(format!("the {} thread is gone", self.name));
        }
        done.recv()
            .map_err(|_| format!("the {} thread ended before answering", self.name))?
    }

    /// Installs the thread's seccomp filter; returns once it is in force.
    pub fn confine(&self) -> Result<(), String> {
        let kind = self.kind;
        self.ask(|reply| Control::Confine(kind, reply))
    }
}

impl crate::jail::JoinJail for HelperThread {
    fn join(&self, mount_ns: BorrowedFd<'_>, root: BorrowedFd<'_>) -> Result<(), String> {
        self.ask(|reply| Control::JoinJail {
            mount_ns: mount_ns.as_raw_fd(),
            root: root.as_raw_fd(),
            reply,
        })
    }
}
