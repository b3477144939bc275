//! A server-side SPDY/3.1 session over an upgraded connection.
//!
//! One reader task decodes frames (owning the receive zlib context), one writer task
//! encodes them (owning the send context); everything else talks to the writer through a
//! channel, so frames go out whole and in order.
//!
//! Streams: the client opens every stream (kubelet's protocol); each SYN_STREAM is answered
//! with a SYN_REPLY at once (as k8s.io/apimachinery's spdy server does) and handed to
//! `Session::accept`.
//!
//! Flow control (SPDY/3.1 section 2.6.8): we track the peer's per-stream and session
//! windows (64 KiB initially, raised by WINDOW_UPDATE and SETTINGS_INITIAL_WINDOW_SIZE),
//! and acknowledge what we receive with WINDOW_UPDATEs. Go's spdystream, which kubectl and
//! crictl use, neither sends WINDOW_UPDATE nor honours ours; blocking on its window would
//! hang every exec that prints more than 64 KiB. So the send window is enforced only once
//! the peer has shown it does flow control (a WINDOW_UPDATE or an initial-window SETTINGS).
//! Receive memory is bounded regardless: each stream's inbound queue holds a few frames
//! and the reader stops reading the socket while it is full.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::frame::{goaway, Frame, FrameEncoder, FrameError, Headers, FLAG_FIN};

/// SPDY/3.1's default initial window, per stream and for the session.
pub const DEFAULT_WINDOW: u32 = 64 * 1024;

#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Largest frame accepted from the peer.
    pub max_frame_len: usize,
    /// Largest inflated header block accepted from the peer.
    pub max_header_block: usize,
    /// Largest DATA frame we send.
    pub max_send_frame: usize,
    /// Streams open at once; more are refused with RST_STREAM REFUSED_STREAM.
    pub max_streams: usize,
    /// Inbound frames queued per stream before the reader stops reading the socket.
    pub stream_queue: usize,
    /// Send a PING this often (kubelet's clients do the same, to keep proxies from
    /// closing an idle exec).
    pub ping_interval: Option<Duration>,
    /// After our GOAWAY, how long `close` waits for the client to close the connection
    /// itself. Clients that parse asynchronously (node's spdy-transport inflates headers
    /// on a zlib worker) abort every stream whose frames they have not parsed yet when the
    /// socket ends under them; kubectl closes its side as soon as it has the status.
    pub close_linger: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_frame_len: 256 * 1024,
            max_header_block: 64 * 1024,
            max_send_frame: 32 * 1024,
            // Worst case buffered per connection: streams x queue x frame = 100 x 4 x
            // 256 KiB; exec needs 5 streams, port-forward 2 per forwarded connection.
            max_streams: 100,
            stream_queue: 4,
            ping_interval: Some(Duration::from_secs(5)),
            close_linger: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connection closed")]
    Closed,
    #[error("stream {0} was reset by the peer")]
    Reset(u32),
    #[error("stream {0} is already finished")]
    Finished(u32),
    #[error("protocol error: {0}")]
    Protocol(#[from] FrameError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

enum Out {
    Frame(Frame),
    /// GOAWAY and flush; the connection stays up for the peer to close.
    GoAway,
    /// GOAWAY, flush, shut the socket down.
    Shutdown(u32),
    /// Shut the socket down (after a GOAWAY).
    Close,
}

#[derive(Default)]
struct StreamState {
    inbound: Option<mpsc::Sender<Bytes>>,
    send_window: i64,
    recv_unacked: u32,
    reset: bool,
    fin_sent: bool,
}

struct Shared {
    streams: HashMap<u32, StreamState>,
    session_send_window: i64,
    initial_send_window: i64,
    enforce_flow_control: bool,
    closed: bool,
    /// Highest stream id the peer opened: GOAWAY names it, so that the peer knows every
    /// stream up to it was processed (a lower id would make it abort finished streams).
    last_peer_stream: u32,
    /// Received bytes not yet acknowledged at the session level.
    session_recv_unacked: u32,
}

struct Inner {
    state: Mutex<Shared>,
    window_changed: Notify,
    out: mpsc::Sender<Out>,
    cfg: SessionConfig,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // A panic while holding the lock leaves plain counters behind: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A stream the client opened, with its headers.
pub struct Stream {
    pub id: u32,
    pub headers: Headers,
    pub reader: StreamReader,
    pub writer: StreamWriter,
}

/// The inbound half: data until the peer's FIN (or a reset, or the connection's end).
pub struct StreamReader {
    rx: mpsc::Receiver<Bytes>,
}

impl StreamReader {
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }
}

/// The outbound half; clones share the stream.
#[derive(Clone)]
pub struct StreamWriter {
    id: u32,
    inner: Arc<Inner>,
}

impl StreamWriter {
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Sends `data` in DATA frames, waiting for window where the peer does flow control.
    pub async fn write_all(&self, mut data: &[u8]) -> Result<(), SessionError> {
        while !data.is_empty() {
            let n = self.reserve(data.len()).await?;
            let (chunk, rest) = data.split_at(n);
            self.send(Frame::Data {
                stream_id: self.id,
                flags: 0,
                data: Bytes::copy_from_slice(chunk),
            })
            .await?;
            data = rest;
        }
        Ok(())
    }

    /// Half-closes our side (an empty DATA frame with FIN). Idempotent.
    pub async fn finish(&self) -> Result<(), SessionError> {
        {
            let mut s = self.inner.lock();
            let st = s.streams.get_mut(&self.id).ok_or(SessionError::Closed)?;
            if st.fin_sent || st.reset {
                return Ok(());
            }
            st.fin_sent = true;
        }
        self.send(Frame::Data {
            stream_id: self.id,
            flags: FLAG_FIN,
            data: Bytes::new(),
        })
        .await?;
        self.inner.maybe_forget(self.id);
        Ok(())
    }

    /// Aborts the stream with RST_STREAM.
    pub async fn reset(&self, status: u32) -> Result<(), SessionError> {
        {
            let mut s = self.inner.lock();
            if let Some(st) = s.streams.get_mut(&self.id) {
                st.reset = true;
                st.inbound = None;
            }
        }
        self.inner.lock().streams.remove(&self.id);
        self.send(Frame::RstStream {
            stream_id: self.id,
            status,
        })
        .await
    }

    async fn send(&self, f: Frame) -> Result<(), SessionError> {
        self.inner
            .out
            .send(Out::Frame(f))
            .await
            .map_err(|_| SessionError::Closed)
    }

    /// Waits until at least one byte may be sent and takes up to `want` of the window.
    async fn reserve(&self, want: usize) -> Result<usize, SessionError> {
        let want = want.min(self.inner.cfg.max_send_frame) as i64;
        loop {
            let mut notified = pin!(self.inner.window_changed.notified());
            notified.as_mut().enable();
            {
                let mut s = self.inner.lock();
                if s.closed {
                    return Err(SessionError::Closed);
                }
                let enforce = s.enforce_flow_control;
                let session_window = s.session_send_window;
                let st = s.streams.get_mut(&self.id).ok_or(SessionError::Closed)?;
                if st.reset {
                    return Err(SessionError::Reset(self.id));
                }
                if st.fin_sent {
                    return Err(SessionError::Finished(self.id));
                }
                let n = if enforce {
                    want.min(st.send_window).min(session_window)
                } else {
                    want
                };
                if n > 0 {
                    st.send_window -= n;
                    s.session_send_window -= n;
                    return Ok(n as usize);
                }
            }
            notified.await;
        }
    }
}

impl Inner {
    /// Drops a stream's state once both directions are done.
    fn maybe_forget(&self, id: u32) {
        let mut s = self.lock();
        if let Some(st) = s.streams.get(&id) {
            if st.fin_sent && st.inbound.is_none() {
                s.streams.remove(&id);
            }
        }
    }
}

/// A running session: accept streams, then `close` it.
pub struct Session {
    incoming: mpsc::Receiver<Stream>,
    inner: Arc<Inner>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Session {
    pub fn start<IO>(io: IO, cfg: SessionConfig) -> Session
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(io);
        let (out_tx, out_rx) = mpsc::channel(64);
        let (in_tx, in_rx) = mpsc::channel(16);
        let inner = Arc::new(Inner {
            state: Mutex::new(Shared {
                streams: HashMap::new(),
                session_send_window: i64::from(DEFAULT_WINDOW),
                initial_send_window: i64::from(DEFAULT_WINDOW),
                enforce_flow_control: false,
                closed: false,
                last_peer_stream: 0,
                session_recv_unacked: 0,
            }),
            window_changed: Notify::new(),
            out: out_tx,
            cfg,
        });
        let writer = tokio::spawn(write_loop(wr, out_rx, inner.clone()));
        let reader = tokio::spawn(read_loop(rd, in_tx, inner.clone()));
        Session {
            incoming: in_rx,
            inner,
            reader,
            writer,
        }
    }

    /// The next stream the client opens; `None` once the connection is gone.
    pub async fn accept(&mut self) -> Option<Stream> {
        self.incoming.recv().await
    }

    /// Sends GOAWAY with what is queued, gives the client `close_linger` to close the
    /// connection, then closes it.
    pub async fn close(mut self) {
        let _ = self.inner.out.send(Out::GoAway).await;
        let linger = self.inner.cfg.close_linger;
        let _ = tokio::time::timeout(linger, &mut self.reader).await;
        let _ = self.inner.out.send(Out::Close).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.writer).await;
        self.reader.abort();
        mark_closed(&self.inner);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // A dropped session stops reading at once; the writer gets to send what is queued
        // (a GOAWAY after a protocol error, say) and then closes the socket.
        self.reader.abort();
        if self.inner.out.try_send(Out::Close).is_err() {
            self.writer.abort();
        }
    }
}

fn mark_closed(inner: &Inner) {
    let mut s = inner.lock();
    s.closed = true;
    for st in s.streams.values_mut() {
        st.inbound = None;
    }
    drop(s);
    inner.window_changed.notify_waiters();
}

async fn write_loop<W: AsyncWrite>(wr: W, mut rx: mpsc::Receiver<Out>, inner: Arc<Inner>) {
    let mut wr = pin!(wr);
    let mut enc = FrameEncoder::new();
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut ping_id: u32 = 0;
    // First ping one period in, not at once: a short exec never needs one.
    let mut ticker = inner
        .cfg
        .ping_interval
        .map(|p| tokio::time::interval_at(tokio::time::Instant::now() + p, p));
    loop {
        let msg = match ticker.as_mut() {
            Some(t) => tokio::select! {
                m = rx.recv() => m,
                _ = t.tick() => {
                    // Server-initiated pings carry even ids (section 2.6.5).
                    ping_id = ping_id.wrapping_add(2).max(2);
                    Some(Out::Frame(Frame::Ping { id: ping_id }))
                }
            },
            None => rx.recv().await,
        };
        let Some(msg) = msg else { break };
        let goaway = |status| Frame::GoAway {
            last_good_stream_id: inner.lock().last_peer_stream,
            status,
        };
        let (frame, shutdown) = match msg {
            Out::Frame(f) => (f, false),
            Out::GoAway => (goaway(goaway::OK), false),
            Out::Shutdown(status) => (goaway(status), true),
            Out::Close => break,
        };
        buf.clear();
        if let Err(e) = enc.encode(&frame, &mut buf) {
            warn!(error = %e, "spdy: cannot encode a frame");
            break;
        }
        if let Err(e) = wr.write_all(&buf).await {
            debug!(error = %e, "spdy: write failed");
            break;
        }
        // Flush when nothing else is queued: batches bursts, never sits on a lone frame.
        let goaway_sent = matches!(frame, Frame::GoAway { .. });
        if (rx.is_empty() || goaway_sent) && wr.flush().await.is_err() {
            break;
        }
        if shutdown {
            break;
        }
    }
    let _ = wr.shutdown().await;
    mark_closed(&inner);
}

// The receive side (frame handling) lives in its own file; as a child module it sees the
// session's private state.
#[path = "session_read.rs"]
mod read;
use read::read_loop;

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
