//! A container's output, fanned out to the clients attached to it. The log pump
//! (`logs::spawn_writer`) hands every chunk it reads from the container's stdout/stderr
//! FIFOs here besides writing the CRI log; each attached client subscribes with a channel
//! per stream it asked for.
//!
//! The log pump must never wait on a client: a subscriber whose channel is full (a client
//! that stopped reading) loses that stream (its channel is closed, so its output ends)
//! rather than stalling the log or the container, which would block writing to a full
//! FIFO. When a stream reaches EOF (the container's output ended) every subscriber's
//! channel for it is closed, and later subscribers get it closed at once.

use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::logs::Stream;

/// Chunks (of up to the log pump's read size) a subscriber may have unread.
pub const SUBSCRIBER_BACKLOG: usize = 64;

struct Subscriber {
    id: u64,
    stdout: Option<mpsc::Sender<Bytes>>,
    stderr: Option<mpsc::Sender<Bytes>>,
}

impl Subscriber {
    fn slot(&mut self, s: Stream) -> &mut Option<mpsc::Sender<Bytes>> {
        match s {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        }
    }
}

#[derive(Default)]
struct Inner {
    subs: Vec<Subscriber>,
    next_id: u64,
    /// Streams that reached EOF: [stdout, stderr].
    ended: [bool; 2],
}

fn index(s: Stream) -> usize {
    match s {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

/// One container's output fan-out.
pub struct Fanout {
    inner: Mutex<Inner>,
    /// How many of the two streams reached EOF (for [`Fanout::wait_ended`]).
    ended: watch::Sender<u8>,
}

impl Default for Fanout {
    fn default() -> Self {
        Fanout {
            inner: Mutex::default(),
            ended: watch::channel(0).0,
        }
    }
}

impl Fanout {
    /// Adds a subscriber; returns its id for [`Fanout::unsubscribe`]. A stream that has
    /// already ended gets its channel closed at once.
    pub fn subscribe(
        &self,
        stdout: Option<mpsc::Sender<Bytes>>,
        stderr: Option<mpsc::Sender<Bytes>>,
    ) -> u64 {
        let mut g = self.inner.lock().expect("fanout lock");
        let id = g.next_id;
        g.next_id += 1;
        let [out_ended, err_ended] = g.ended;
        g.subs.push(Subscriber {
            id,
            stdout: stdout.filter(|_| !out_ended),
            stderr: stderr.filter(|_| !err_ended),
        });
        id
    }

    /// Removes a subscriber (its channels close).
    pub fn unsubscribe(&self, id: u64) {
        self.inner
            .lock()
            .expect("fanout lock")
            .subs
            .retain(|s| s.id != id);
    }

    /// Subscribers still present.
    pub fn subscribers(&self) -> usize {
        self.inner.lock().expect("fanout lock").subs.len()
    }

    /// Hands a chunk of `stream` to every subscriber of it, without waiting.
    pub fn send(&self, stream: Stream, data: &[u8]) {
        let mut g = self.inner.lock().expect("fanout lock");
        if g.subs.is_empty() {
            return;
        }
        let chunk = Bytes::copy_from_slice(data);
        for sub in &mut g.subs {
            let id = sub.id;
            let slot = sub.slot(stream);
            let Some(tx) = slot else { continue };
            match tx.try_send(chunk.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    warn!(
                        subscriber = id,
                        ?stream,
                        "an attached client fell behind; its output ends"
                    );
                    *slot = None;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => *slot = None,
            }
        }
    }

    /// `stream` reached EOF: every subscriber's channel for it closes.
    pub fn close(&self, stream: Stream) {
        let mut g = self.inner.lock().expect("fanout lock");
        if std::mem::replace(&mut g.ended[index(stream)], true) {
            return;
        }
        for sub in &mut g.subs {
            *sub.slot(stream) = None;
        }
        let n = g.ended.iter().filter(|e| **e).count() as u8;
        drop(g);
        self.ended.send_replace(n);
    }

    /// Waits until both streams reached EOF.
    pub async fn wait_ended(&self) {
        let mut rx = self.ended.subscribe();
        let _ = rx.wait_for(|n| *n >= 2).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn every_subscriber_gets_its_streams_then_eof() {
        let f = Fanout::default();
        let (o1, mut ro1) = mpsc::channel(8);
        let (e1, mut re1) = mpsc::channel(8);
        let (o2, mut ro2) = mpsc::channel(8);
        f.subscribe(Some(o1), Some(e1));
        f.subscribe(Some(o2), None);
        f.send(Stream::Stdout, b"out");
        f.send(Stream::Stderr, b"err");
        assert_eq!(ro1.recv().await.unwrap(), "out");
        assert_eq!(re1.recv().await.unwrap(), "err");
        assert_eq!(ro2.recv().await.unwrap(), "out");
        f.close(Stream::Stdout);
        assert_eq!(ro1.recv().await, None, "stdout ended for the first");
        assert_eq!(ro2.recv().await, None, "and for the second");
        // stderr is still open for the first.
        f.send(Stream::Stderr, b"more");
        assert_eq!(re1.recv().await.unwrap(), "more");
        f.close(Stream::Stderr);
        assert_eq!(re1.recv().await, None);
        tokio::time::timeout(Duration::from_secs(1), f.wait_ended())
            .await
            .expect("both streams ended");
    }

    #[tokio::test]
    async fn a_late_subscriber_to_an_ended_stream_gets_eof_at_once() {
        let f = Fanout::default();
        f.close(Stream::Stderr);
        let (o, mut ro) = mpsc::channel(8);
        let (e, mut re) = mpsc::channel(8);
        f.subscribe(Some(o), Some(e));
        assert_eq!(re.recv().await, None);
        f.send(Stream::Stdout, b"x");
        assert_eq!(ro.recv().await.unwrap(), "x");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), f.wait_ended())
                .await
                .is_err(),
            "stdout has not ended"
        );
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_loses_its_stream_not_the_others() {
        let f = Fanout::default();
        let (slow, mut slow_rx) = mpsc::channel(2);
        let (fast, mut fast_rx) = mpsc::channel(SUBSCRIBER_BACKLOG);
        f.subscribe(Some(slow), None);
        f.subscribe(Some(fast), None);
        for i in 0..5u8 {
            // Never blocks, however full the slow one is.
            f.send(Stream::Stdout, &[i]);
        }
        // The slow one got what fitted, then its stream closed.
        assert_eq!(slow_rx.recv().await.unwrap(), [0u8].as_slice());
        assert_eq!(slow_rx.recv().await.unwrap(), [1u8].as_slice());
        assert_eq!(slow_rx.recv().await, None);
        for i in 0..5u8 {
            assert_eq!(fast_rx.recv().await.unwrap(), [i].as_slice());
        }
    }

    #[tokio::test]
    async fn unsubscribing_and_dropped_receivers_are_forgotten() {
        let f = Fanout::default();
        let (o, ro) = mpsc::channel(8);
        let id = f.subscribe(Some(o), None);
        let (o2, mut ro2) = mpsc::channel(8);
        let id2 = f.subscribe(Some(o2), None);
        assert_eq!(f.subscribers(), 2);
        drop(ro); // the client went away
        f.send(Stream::Stdout, b"a");
        assert_eq!(ro2.recv().await.unwrap(), "a");
        f.unsubscribe(id2);
        assert_eq!(ro2.recv().await, None, "unsubscribed: channel closed");
        f.unsubscribe(id);
        assert_eq!(f.subscribers(), 0);
    }
}
