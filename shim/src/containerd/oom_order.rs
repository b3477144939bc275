//! containerd's order for an OOM kill: TaskOOM before the TaskExit of the killed task (CRI
//! sets the container's reason `OOMKilled` from TaskOOM; a kubelet reading the status
//! between an earlier TaskExit and TaskOOM would see `Error`).
//!
//! The two come from different agent calls: TaskOOM from the GetOOMEvent loop, TaskExit
//! from WaitProcess. The agent checks the container's OOM count before it answers
//! WaitProcess and numbers its OOM events; the answer carries the last number. The OOM
//! watcher marks each event published ([`OomOrder::published`]) and the exit waiter waits
//! for its number ([`OomOrder::wait_for`]) before publishing TaskExit.

use std::time::Duration;

use tokio::sync::watch;

/// How long an exit waits for the OOM events before it: bounded, so that a watcher that
/// ended (the VM went away) cannot hold an exit back for good.
pub const OOM_WAIT: Duration = Duration::from_secs(2);

/// The last OOM event sequence number the shim has published (or dropped).
#[derive(Debug)]
pub struct OomOrder {
    published: watch::Sender<u64>,
}

impl Default for OomOrder {
    fn default() -> Self {
        OomOrder {
            published: watch::channel(0).0,
        }
    }
}

impl OomOrder {
    /// Event `seq` and every one before it are out.
    pub fn published(&self, seq: u64) {
        self.published.send_if_modified(|p| {
            let newer = seq > *p;
            if newer {
                *p = seq;
            }
            newer
        });
    }

    /// Waits until event `seq` is published, for at most `timeout`; false if it was not.
    pub async fn wait_for(&self, seq: u64, timeout: Duration) -> bool {
        let mut rx = self.published.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|p| *p >= seq))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn an_exit_waits_for_the_oom_events_queued_before_it() {
        let order = Arc::new(OomOrder::default());
        assert!(order.wait_for(0, Duration::ZERO).await, "no OOM: no wait");
        let o = order.clone();
        let waiter = tokio::spawn(async move { o.wait_for(2, Duration::from_secs(10)).await });
        order.published(1);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "event 2 is not out yet");
        order.published(2);
        assert!(waiter.await.unwrap());
        // Numbers only go up.
        order.published(1);
        assert!(order.wait_for(2, Duration::ZERO).await);
        // An event that never comes holds an exit back only so long.
        assert!(!order.wait_for(3, Duration::from_millis(50)).await);
    }
}
