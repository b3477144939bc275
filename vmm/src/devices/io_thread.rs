//! An event loop thread of its own for a device whose back end can block.
//!
//! A disk read can take seconds (a slow or stalled backing store). On the VMM's main loop it
//! would stall vsock, the control API and every other device for that long; on its own thread
//! it stalls only that disk's queue, which is what a real disk does to its guest. The thread
//! runs under the `DeviceIo` seccomp filter (its loop and file I/O, nothing else), and ends
//! with the process.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use tracing::error;

use crate::seccomp::{self, ThreadKind};

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum IoThreadError {
    #[error("cannot start the I/O thread {name}: {source}")]
    Spawn {
        name: String,
        source: std::io::Error,
    },
    #[error("I/O thread {name}: {reason}")]
    Setup { name: String, reason: String },
}

/// Starts thread `name` serving `device`'s events; returns once the thread has its event
/// loop and (with `seccomp`) its filter, so a failure is the caller's start-up error.
pub fn spawn(
    name: &str,
    device: Subscriber,
    seccomp: bool,
) -> Result<JoinHandle<()>, IoThreadError> {
    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), String>>(1);
    let handle = std::thread::Builder::new()
        .name(name.to_string())
        .stack_size(crate::THREAD_STACK_SIZE)
        .spawn(move || {
            // The epoll fd comes first: the filter does not allow making one.
            let mut em = match EventManager::<Subscriber>::new() {
                Ok(em) => em,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("cannot create its event loop: {e:?}")));
                    return;
                }
            };
            if seccomp {
                if let Err(e) = seccomp::install(ThreadKind::DeviceIo) {
                    let _ = ready_tx.send(Err(format!("cannot install its seccomp filter: {e}")));
                    return;
                }
            }
            em.add_subscriber(device);
            let _ = ready_tx.send(Ok(()));
            loop {
                if let Err(e) = em.run() {
                    error!("device I/O thread: event loop failed: {e:?}");
                    return;
                }
            }
        })
        .map_err(|source| IoThreadError::Spawn {
            name: name.to_string(),
            source,
        })?;
    let setup = |reason: String| IoThreadError::Setup {
        name: name.to_string(),
        reason,
    };
    ready_rx
        .recv()
        .map_err(|_| setup("ended before it was ready".into()))?
        .map_err(setup)?;
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventOps, Events};
    use vmm_sys_util::epoll::EventSet;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// Counts its eventfd's wake-ups and notes the thread it ran on.
    struct Probe {
        evt: EventFd,
        seen: mpsc::Sender<String>,
    }

    impl MutEventSubscriber for Probe {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _: Events, _: &mut EventOps) {
            let _ = self.evt.read();
            let name = std::thread::current().name().unwrap_or("").to_string();
            let _ = self.seen.send(name);
        }
    }

    #[test]
    fn events_are_served_on_the_named_thread() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick = evt.try_clone().unwrap();
        let (seen, got) = mpsc::channel();
        // No filter here: it would stay on this test binary's thread for good, harmlessly,
        // but the seccomp tests check the filter itself in a child process.
        let _thread = spawn(
            "husk-test-io",
            Arc::new(Mutex::new(Probe { evt, seen })),
            false,
        )
        .unwrap();
        kick.write(1).unwrap();
        let name = got
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the I/O thread never served the event");
        assert_eq!(name, "husk-test-io");
    }
}
