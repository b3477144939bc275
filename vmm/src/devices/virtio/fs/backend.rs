//! The vhost-user worker: the one thread that talks to virtiofsd once the VM runs.
//!
//! The transport activates and resets the device on a vCPU thread, under the device's mutex,
//! which the event loop also takes (virtiofsd's used-buffer signals). Talking vhost-user
//! there would let a slow or hung virtiofsd stall a vCPU and, through the mutex, the event
//! loop (vsock, the control API) for as long as the watchdog allows. So the device only
//! checks and prepares an activation or reset on the vCPU thread and queues it here; this
//! thread owns the `Frontend`, runs the exchanges in order, each bounded by the watchdog, and
//! marks the connection broken if one fails. The guest learns of a failed activation as it
//! would of virtiofsd dying: its requests go unanswered.
//!
//! A reset is the exception: the caller waits for it. Once a reset returns, the driver may
//! rewrite the rings' memory, which virtiofsd must have stopped reading by then (virtio 1.2
//! 2.4: a reset is complete when the device says so). Resets are rare (driver reload,
//! reboot), and the wait is bounded by the same watchdog.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use super::watchdog::Watchdog;
use crate::devices::helper_thread::{Control, HelperThread};
use crate::seccomp::ThreadKind;

/// One ring to hand to virtiofsd, prepared on the vCPU thread.
pub(super) struct VringJob {
    pub index: usize,
    pub size: u16,
    pub config: VringConfigData,
    pub base: u16,
    /// Our copies (dups) of the eventfds: the worker sends them, the device keeps its own.
    pub call: EventFd,
    pub kick: EventFd,
}

/// An activation: guest memory and the ready rings.
pub(super) struct ActivateJob {
    pub acked_features: u64,
    pub regions: Vec<VhostUserMemoryRegionInfo>,
    pub vrings: Vec<VringJob>,
}

enum Job {
    Activate(ActivateJob),
    /// Stop the rings that were started, then RESET_DEVICE; answers whether that worked.
    Reset {
        started: Vec<usize>,
        done: mpsc::SyncSender<bool>,
    },
    Control(Control),
    /// End the worker. Explicit, because the controller's handles also hold senders, so
    /// the channel alone would not close while they live.
    Stop,
    /// Answered once every job before it is done (tests wait on it).
    #[cfg(test)]
    Sync(mpsc::SyncSender<()>),
}

pub(super) struct Backend {
    tx: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    /// Starts the worker with the connected `frontend` and its `watchdog`. `broken` is set
    /// when an exchange fails, after which requests and replies may be out of step.
    pub(super) fn start(
        tag: String,
        frontend: Frontend,
        watchdog: Watchdog,
        exchange_timeout: Duration,
        broken: Arc<AtomicBool>,
    ) -> std::io::Result<Backend> {
        let (tx, rx) = mpsc::channel::<Job>();
        let mut worker = Worker {
            tag,
            frontend,
            watchdog,
            exchange_timeout,
            broken,
        };
        let thread = thread::Builder::new()
            .name("husk-fs-vhost".into())
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn(move || {
                for job in rx {
                    match job {
                        Job::Activate(a) => worker.activate(a),
                        Job::Reset { started, done } => {
                            let _ = done.send(worker.reset(&started));
                        }
                        Job::Control(c) => c.run("the virtio-fs vhost-user worker"),
                        Job::Stop => break,
                        #[cfg(test)]
                        Job::Sync(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })?;
        Ok(Backend {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn send(&self, job: Job) {
        if let Some(tx) = &self.tx {
            // Fails only once the worker is gone, which the device's drop alone causes.
            let _ = tx.send(job);
        }
    }

    pub(super) fn activate(&self, job: ActivateJob) {
        self.send(Job::Activate(job));
    }

    /// Runs a reset after whatever is queued, and waits for it (see the module docs).
    pub(super) fn reset(&self, started: Vec<usize>) -> bool {
        let (done, wait) = mpsc::sync_channel(1);
        self.send(Job::Reset { started, done });
        wait.recv().unwrap_or(false)
    }

    /// The controller's handle on the worker thread (jail, seccomp).
    pub(super) fn helper(&self) -> Option<HelperThread> {
        Some(HelperThread::new(
            "virtio-fs vhost-user worker",
            ThreadKind::VhostUser,
            self.tx.clone()?,
            Job::Control,
        ))
    }

    /// Waits until every job queued so far is done.
    #[cfg(test)]
    pub(super) fn wait_idle(&self) {
        let (done, wait) = mpsc::sync_channel(1);
        self.send(Job::Sync(done));
        let _ = wait.recv();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // Ends the worker's loop; joined so the frontend's socket (and the watchdog's copy) is
        // closed before the device is gone: virtiofsd sees the hang-up only then.
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Job::Stop);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    tag: String,
    frontend: Frontend,
    watchdog: Watchdog,
    exchange_timeout: Duration,
    broken: Arc<AtomicBool>,
}

impl Worker {
    fn activate(&mut self, job: ActivateJob) {
        if self.broken.load(Ordering::SeqCst) {
            tracing::error!(tag = %self.tag, "virtio-fs: not activated: the vhost-user connection is lost");
            return;
        }
        let features = job.acked_features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let armed = self.watchdog.arm(self.exchange_timeout, "activation");
        let fe = &mut self.frontend;
        let result = (|| {
            fe.set_features(features).map_err(|e| ("SET_FEATURES", e))?;
            fe.set_mem_table(&job.regions)
                .map_err(|e| ("SET_MEM_TABLE", e))?;
            for v in &job.vrings {
                fe.set_vring_num(v.index, v.size)
                    .map_err(|e| ("SET_VRING_NUM", e))?;
                fe.set_vring_addr(v.index, &v.config)
                    .map_err(|e| ("SET_VRING_ADDR", e))?;
                fe.set_vring_base(v.index, v.base)
                    .map_err(|e| ("SET_VRING_BASE", e))?;
                fe.set_vring_call(v.index, &v.call)
                    .map_err(|e| ("SET_VRING_CALL", e))?;
                // The guest's notifications go straight to virtiofsd, never through the VMM.
                fe.set_vring_kick(v.index, &v.kick)
                    .map_err(|e| ("SET_VRING_KICK", e))?;
                fe.set_vring_enable(v.index, true)
                    .map_err(|e| ("SET_VRING_ENABLE", e))?;
            }
            Ok::<(), (&'static str, vhost::Error)>(())
        })();
        drop(armed);
        match result {
            Ok(()) => tracing::info!(
                tag = %self.tag,
                queues = ?job.vrings.iter().map(|v| v.index).collect::<Vec<_>>(),
                features = format_args!("{:#x}", job.acked_features),
                "virtio-fs: activated"
            ),
            Err((step, err)) => self.failed(step, err),
        }
    }

    fn reset(&mut self, started: &[usize]) -> bool {
        if self.broken.load(Ordering::SeqCst) {
            return false;
        }
        let armed = self.watchdog.arm(self.exchange_timeout, "reset");
        let fe = &mut self.frontend;
        let result = (|| {
            for &index in started {
                // Per the vhost-user spec, GET_VRING_BASE stops the ring; virtiofsd also drops
                // its copies of the kick and call fds.
                fe.get_vring_base(index)
                    .map_err(|e| ("GET_VRING_BASE", e))?;
            }
            fe.reset_device().map_err(|e| ("RESET_DEVICE", e))
        })();
        drop(armed);
        match result {
            Ok(()) => {
                tracing::info!(tag = %self.tag, "virtio-fs: reset");
                true
            }
            Err((step, err)) => {
                self.failed(step, err);
                false
            }
        }
    }

    /// A failed exchange: the connection can no longer be trusted, and the log says whether
    /// virtiofsd answered wrongly or not at all.
    fn failed(&mut self, step: &'static str, err: vhost::Error) {
        self.broken.store(true, Ordering::SeqCst);
        if self.watchdog.fired() {
            tracing::error!(
                tag = %self.tag,
                "virtio-fs: virtiofsd did not answer {step} within {:?}; the file system stops",
                self.exchange_timeout
            );
        } else {
            tracing::error!(tag = %self.tag, "virtio-fs: vhost-user {step} failed: {err}; the file system stops");
        }
    }
}
