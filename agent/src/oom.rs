//! OOM events: each container's cgroup OOM-kill count, turned into a queue of numbered
//! events that the host drains with GetOOMEvent.
//!
//! The count is polled, and also checked when a process's exit is reported (WaitProcess):
//! an OOM kill that ended the process is then queued before the exit is answered, and the
//! answer carries the queue's sequence number, so the host can publish containerd's TaskOOM
//! before the TaskExit of the killed task.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::cgroups;

#[derive(Default)]
struct Inner {
    queue: VecDeque<(u64, String)>,
    /// The last sequence number given out.
    seq: u64,
    /// Each watched container's OOM-kill count as last seen.
    seen: HashMap<String, u64>,
}

/// The agent's OOM events.
#[derive(Default)]
pub struct OomEvents {
    inner: Mutex<Inner>,
    notify: Notify,
}

impl OomEvents {
    pub fn new() -> OomEvents {
        OomEvents::default()
    }

    /// Starts watching container `cid`: kills counted from now on are events.
    pub fn watch(&self, cid: &str, cgroup: &Path) {
        let now = cgroups::oom_kills(cgroup).unwrap_or(0);
        self.lock().seen.insert(cid.to_string(), now);
    }

    pub fn forget(&self, cid: &str) {
        self.lock().seen.remove(cid);
    }

    /// Reads `cid`'s cgroup and queues an event if it counts new kills.
    pub fn check(&self, cid: &str, cgroup: &Path) {
        self.observe(cid, cgroups::oom_kills(cgroup));
    }

    /// Queues an event for `cid` if `kills` is more than last seen (one event however many:
    /// containerd only marks the container OOM-killed).
    fn observe(&self, cid: &str, kills: Option<u64>) {
        let Some(kills) = kills else {
            return;
        };
        let mut g = self.lock();
        let Some(seen) = g.seen.get_mut(cid) else {
            return;
        };
        if kills <= *seen {
            return;
        }
        tracing::warn!(container = %cid, kills = kills - *seen, "OOM kill in container");
        *seen = kills;
        g.seq += 1;
        let seq = g.seq;
        g.queue.push_back((seq, cid.to_string()));
        drop(g);
        self.notify.notify_one();
    }

    /// The sequence number of the last event queued (0: none yet).
    pub fn seq(&self) -> u64 {
        self.lock().seq
    }

    /// The next event, in order: its sequence number and container.
    pub async fn next(&self) -> (u64, String) {
        loop {
            let notified = self.notify.notified();
            if let Some(ev) = self.lock().queue.pop_front() {
                return ev;
            }
            notified.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn new_kills_of_watched_containers_are_numbered_events() {
        let ev = OomEvents::new();
        ev.lock().seen.insert("a".into(), 2);
        ev.lock().seen.insert("b".into(), 0);
        ev.observe("a", Some(2));
        ev.observe("a", None);
        ev.observe("unknown", Some(5));
        assert_eq!(ev.seq(), 0, "no new kill, no event");
        ev.observe("a", Some(4));
        ev.observe("a", Some(4));
        ev.observe("b", Some(1));
        assert_eq!(ev.seq(), 2);
        assert_eq!(ev.next().await, (1, "a".to_string()));
        assert_eq!(ev.next().await, (2, "b".to_string()));
        ev.forget("b");
        ev.observe("b", Some(9));
        assert_eq!(ev.seq(), 2, "a forgotten container has no events");
    }
}
