//! The receive side of a SPDY session: decoding frames off the socket and acting on each
//! (see `session.rs` for the design).

use std::pin::pin;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{
    Inner, Out, SessionError, Stream, StreamReader, StreamState, StreamWriter, DEFAULT_WINDOW,
};
use crate::streaming::spdy::frame::{
    goaway, rst, Frame, FrameDecoder, FrameError, Headers, FLAG_FIN, SETTINGS_INITIAL_WINDOW_SIZE,
};

pub(super) async fn read_loop<R: AsyncRead>(
    rd: R,
    incoming: mpsc::Sender<Stream>,
    inner: Arc<Inner>,
) {
    let mut rd = pin!(rd);
    let cfg = inner.cfg.clone();
    let mut dec = FrameDecoder::new(cfg.max_frame_len, cfg.max_header_block);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut last_stream_id = 0u32;
    let mut going_away = false;
    let result: Result<(), SessionError> = async {
        loop {
            while let Some(frame) = dec.decode(&mut buf)? {
                handle_frame(
                    frame,
                    &inner,
                    &incoming,
                    &mut last_stream_id,
                    &mut going_away,
                )
                .await?;
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(16 * 1024);
            }
            if rd.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        }
    }
    .await;
    match result {
        Ok(()) => debug!("spdy: peer closed the connection"),
        Err(SessionError::Protocol(e)) => {
            warn!(error = %e, "spdy: protocol error, closing the connection");
            let _ = inner.out.send(Out::Shutdown(goaway::PROTOCOL_ERROR)).await;
        }
        Err(e) => debug!(error = %e, "spdy: read side ended"),
    }
    // Ends every stream's inbound half; writers fail once the writer task is gone.
    let mut s = inner.lock();
    for st in s.streams.values_mut() {
        st.inbound = None;
    }
}

async fn handle_frame(
    frame: Frame,
    inner: &Arc<Inner>,
    incoming: &mpsc::Sender<Stream>,
    last_stream_id: &mut u32,
    going_away: &mut bool,
) -> Result<(), SessionError> {
    let out = |f: Frame| async {
        inner
            .out
            .send(Out::Frame(f))
            .await
            .map_err(|_| SessionError::Closed)
    };
    match frame {
        Frame::SynStream {
            stream_id,
            flags,
            headers,
            ..
        } => {
            // Client streams are odd and increasing (section 2.3.2); anything else is a
            // protocol error for the whole session.
            if stream_id % 2 == 0 || stream_id <= *last_stream_id {
                return Err(FrameError::Malformed {
                    kind: "SYN_STREAM",
                    why: format!("stream id {stream_id} after {last_stream_id}"),
                }
                .into());
            }
            *last_stream_id = stream_id;
            inner.lock().last_peer_stream = stream_id;
            let open = inner.lock().streams.len();
            if *going_away || open >= inner.cfg.max_streams {
                return out(Frame::RstStream {
                    stream_id,
                    status: rst::REFUSED_STREAM,
                })
                .await;
            }
            let (tx, rx) = mpsc::channel(inner.cfg.stream_queue);
            {
                let mut s = inner.lock();
                let w = s.initial_send_window;
                s.streams.insert(
                    stream_id,
                    StreamState {
                        inbound: (flags & FLAG_FIN == 0).then_some(tx),
                        send_window: w,
                        ..Default::default()
                    },
                );
            }
            // Go's spdystream replies with no headers and ignores them; HTTP-over-SPDY
            // clients (node's spdy-transport) insist on `:status`, which SPDY/3 makes
            // mandatory in a SYN_REPLY. Both are served by sending it.
            out(Frame::SynReply {
                stream_id,
                flags: 0,
                headers: reply_headers(),
            })
            .await?;
            let stream = Stream {
                id: stream_id,
                headers,
                reader: StreamReader { rx },
                writer: StreamWriter {
                    id: stream_id,
                    inner: inner.clone(),
                },
            };
            if incoming.send(stream).await.is_err() {
                // Nobody accepts streams any more: refuse it.
                inner.lock().streams.remove(&stream_id);
                out(Frame::RstStream {
                    stream_id,
                    status: rst::REFUSED_STREAM,
                })
                .await?;
            }
        }
        Frame::Data {
            stream_id,
            flags,
            data,
        } => {
            let len = data.len() as u32;
            let tx = {
                let s = inner.lock();
                s.streams.get(&stream_id).map(|st| st.inbound.clone())
            };
            match tx {
                None => {
                    if stream_id > *last_stream_id {
                        out(Frame::RstStream {
                            stream_id,
                            status: rst::INVALID_STREAM,
                        })
                        .await?;
                    } else {
                        // Data racing our close of the stream: drop it.
                        debug!(stream_id, "spdy: data for a closed stream");
                    }
                    // Still counted against (and given back to) the session window.
                    if let Some(delta) = session_ack(inner, len) {
                        out(Frame::WindowUpdate {
                            stream_id: 0,
                            delta,
                        })
                        .await?;
                    }
                    return Ok(());
                }
                Some(None) => {
                    if len > 0 {
                        // Data after the peer's FIN.
                        out(Frame::RstStream {
                            stream_id,
                            status: rst::STREAM_ALREADY_CLOSED,
                        })
                        .await?;
                    }
                }
                Some(Some(tx)) => {
                    if len > 0 && tx.send(data).await.is_err() {
                        debug!(stream_id, "spdy: data for a stream nobody reads");
                    }
                }
            }
            if len > 0 {
                // Acknowledge consumed data once per half window, per stream and for the
                // session (Go's spdystream parses and drops these; node's uses them).
                let ack = {
                    let mut s = inner.lock();
                    s.streams.get_mut(&stream_id).and_then(|st| {
                        st.recv_unacked += len;
                        (st.recv_unacked >= DEFAULT_WINDOW / 2)
                            .then(|| std::mem::take(&mut st.recv_unacked))
                    })
                };
                if let Some(delta) = ack {
                    out(Frame::WindowUpdate { stream_id, delta }).await?;
                }
                if let Some(delta) = session_ack(inner, len) {
                    out(Frame::WindowUpdate {
                        stream_id: 0,
                        delta,
                    })
                    .await?;
                }
            }
            if flags & FLAG_FIN != 0 {
                close_inbound(inner, stream_id);
            }
        }
        Frame::Headers {
            stream_id, flags, ..
        } => {
            if flags & FLAG_FIN != 0 {
                close_inbound(inner, stream_id);
            }
        }
        Frame::RstStream { stream_id, status } => {
            debug!(stream_id, status, "spdy: stream reset by the peer");
            let mut s = inner.lock();
            if let Some(st) = s.streams.get_mut(&stream_id) {
                st.reset = true;
                st.inbound = None;
            }
            s.streams.remove(&stream_id);
            drop(s);
            inner.window_changed.notify_waiters();
        }
        Frame::Settings { entries, .. } => {
            for (_, id, value) in entries {
                if id == SETTINGS_INITIAL_WINDOW_SIZE {
                    let mut s = inner.lock();
                    let delta = i64::from(value) - s.initial_send_window;
                    s.initial_send_window = i64::from(value);
                    s.enforce_flow_control = true;
                    for st in s.streams.values_mut() {
                        st.send_window += delta;
                    }
                }
            }
            inner.window_changed.notify_waiters();
        }
        Frame::Ping { id } => {
            // Odd ids are the client's: echo them. Even ones answer ours.
            if id % 2 == 1 {
                out(Frame::Ping { id }).await?;
            }
        }
        Frame::GoAway {
            last_good_stream_id,
            status,
        } => {
            debug!(last_good_stream_id, status, "spdy: peer sent GOAWAY");
            *going_away = true;
        }
        Frame::WindowUpdate { stream_id, delta } => {
            let overflow = {
                let mut s = inner.lock();
                s.enforce_flow_control = true;
                if stream_id == 0 {
                    s.session_send_window += i64::from(delta);
                    false
                } else if let Some(st) = s.streams.get_mut(&stream_id) {
                    st.send_window += i64::from(delta);
                    st.send_window > i64::from(i32::MAX)
                } else {
                    false
                }
            };
            inner.window_changed.notify_waiters();
            if overflow {
                return out(Frame::RstStream {
                    stream_id,
                    status: rst::FLOW_CONTROL_ERROR,
                })
                .await;
            }
        }
        Frame::SynReply { stream_id, .. } => {
            // We never open streams, so no reply can be due.
            out(Frame::RstStream {
                stream_id,
                status: rst::PROTOCOL_ERROR,
            })
            .await?;
        }
        Frame::Unknown { frame_type } => {
            debug!(frame_type, "spdy: ignoring a control frame of unknown type");
        }
    }
    Ok(())
}

/// Counts `len` received bytes for the session window; the delta to acknowledge once half
/// the window is used.
fn session_ack(inner: &Inner, len: u32) -> Option<u32> {
    if len == 0 {
        return None;
    }
    let mut s = inner.lock();
    s.session_recv_unacked += len;
    (s.session_recv_unacked >= DEFAULT_WINDOW / 2)
        .then(|| std::mem::take(&mut s.session_recv_unacked))
}

pub(super) fn reply_headers() -> Headers {
    Headers::new()
        .with(":status", "200")
        .with(":version", "HTTP/1.1")
}

fn close_inbound(inner: &Inner, stream_id: u32) {
    {
        let mut s = inner.lock();
        if let Some(st) = s.streams.get_mut(&stream_id) {
            st.inbound = None;
        }
    }
    inner.maybe_forget(stream_id);
}
