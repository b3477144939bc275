//! Exec and attach over WebSocket: the `channel.k8s.io` family (kubelet's `wsstream`).
//!
//! Every message starts with a channel number: 0 stdin, 1 stdout, 2 stderr, 3 error,
//! 4 resize; `v5.channel.k8s.io` adds 255, "close": `[255, n]` closes channel n (the only
//! way a WebSocket client can send stdin EOF). The base64 variants send text messages whose
//! first character is the channel as an ASCII digit and whose rest is base64.

use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, warn};

use super::backend::{ExecIo, StreamBackend};
use super::remotecommand::{Command, ResizeDecoder};
use super::status;

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;

/// A negotiated WebSocket sub-protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsProtocol {
    /// `channel.k8s.io` (also what a client that names no sub-protocol gets).
    V1,
    /// `base64.channel.k8s.io`
    V1Base64,
    /// `v4.channel.k8s.io`
    V4,
    /// `v4.base64.channel.k8s.io`
    V4Base64,
    /// `v5.channel.k8s.io`
    V5,
}

impl WsProtocol {
    /// Server preference order.
    pub const ALL: [WsProtocol; 5] = [
        WsProtocol::V5,
        WsProtocol::V4,
        WsProtocol::V4Base64,
        WsProtocol::V1,
        WsProtocol::V1Base64,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WsProtocol::V1 => "channel.k8s.io",
            WsProtocol::V1Base64 => "base64.channel.k8s.io",
            WsProtocol::V4 => "v4.channel.k8s.io",
            WsProtocol::V4Base64 => "v4.base64.channel.k8s.io",
            WsProtocol::V5 => "v5.channel.k8s.io",
        }
    }

    fn base64(self) -> bool {
        matches!(self, WsProtocol::V1Base64 | WsProtocol::V4Base64)
    }

    fn status_json(self) -> bool {
        matches!(self, WsProtocol::V4 | WsProtocol::V4Base64 | WsProtocol::V5)
    }

    /// The server's preferred protocol among the client's `Sec-WebSocket-Protocol` values;
    /// `Some(None)` when the client named none (binary `channel.k8s.io`, no header in the
    /// answer), `None` when nothing is in common.
    pub fn negotiate<'a>(offered: impl IntoIterator<Item = &'a str>) -> Option<Option<Self>> {
        let offered: Vec<&str> = offered
            .into_iter()
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if offered.is_empty() {
            return Some(None);
        }
        Self::ALL
            .into_iter()
            .find(|p| offered.contains(&p.name()))
            .map(Some)
    }
}

pub fn ws_config() -> WebSocketConfig {
    // Messages are at most a read buffer's worth of stdin or a resize; cap what a client
    // can make us buffer.
    WebSocketConfig::default()
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

fn encode(proto: WsProtocol, channel: u8, data: &[u8]) -> Message {
    if proto.base64() {
        let mut s = String::with_capacity(1 + data.len() * 4 / 3 + 4);
        s.push((b'0' + channel) as char);
        base64::engine::general_purpose::STANDARD.encode_string(data, &mut s);
        Message::Text(s.into())
    } else {
        let mut v = Vec::with_capacity(1 + data.len());
        v.push(channel);
        v.extend_from_slice(data);
        Message::Binary(v.into())
    }
}

fn decode(proto: WsProtocol, msg: Message) -> Option<(u8, Bytes)> {
    match msg {
        Message::Binary(b) if !proto.base64() && !b.is_empty() => {
            Some((b[0], Bytes::copy_from_slice(&b[1..])))
        }
        Message::Text(t) if proto.base64() && !t.is_empty() => {
            let t = t.as_bytes();
            let ch = t[0].checked_sub(b'0')?;
            let data = base64::engine::general_purpose::STANDARD
                .decode(&t[1..])
                .ok()?;
            Some((ch, data.into()))
        }
        _ => None,
    }
}

/// Serves one exec/attach on an upgraded WebSocket connection, then closes it.
pub async fn serve_exec<IO>(
    io: IO,
    proto: WsProtocol,
    cmd: Command,
    backend: Arc<dyn StreamBackend>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config())).await;
    let (mut sink, mut source) = ws.split();
    let (stdin, stdout, stderr, tty) = cmd.flags();

    // One writer: output channels funnel into it, each message tagged with its channel.
    let (out_tx, mut out_rx) = mpsc::channel::<(u8, Bytes)>(16);
    let writer = tokio::spawn(async move {
        while let Some((ch, data)) = out_rx.recv().await {
            if sink.send(encode(proto, ch, &data)).await.is_err() {
                // Client gone: drain so producers never block.
                while out_rx.recv().await.is_some() {}
                return None;
            }
        }
        Some(sink)
    });

    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(8);
    let (resize_tx, resize_rx) = mpsc::channel(4);
    let mut pumps = Vec::new();
    let mut output = |want: bool, ch: u8| {
        want.then(|| {
            let (tx, mut rx) = mpsc::channel::<Bytes>(8);
            let out = out_tx.clone();
            pumps.push(tokio::spawn(async move {
                while let Some(b) = rx.recv().await {
                    if out.send((ch, b)).await.is_err() {
                        break;
                    }
                }
            }));
            tx
        })
    };
    let (gone_tx, gone_rx) = tokio::sync::watch::channel(false);
    let io = ExecIo {
        stdout: output(stdout, STDOUT),
        stderr: output(stderr && !tty, STDERR),
        stdin: stdin.then_some(stdin_rx),
        resize: tty.then_some(resize_rx),
        gone: gone_rx,
    };

    // Reader: demultiplex the client's messages until it closes or the command ends.
    let reader = tokio::spawn(async move {
        let mut stdin_tx = Some(stdin_tx);
        let mut resize = ResizeDecoder::default();
        while let Some(msg) = source.next().await {
            let msg = match msg {
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(m @ (Message::Binary(_) | Message::Text(_))) => m,
                Ok(_) => continue, // ping/pong: tungstenite answers pings itself
            };
            let Some((ch, data)) = decode(proto, msg) else {
                debug!("websocket: ignoring a message in the wrong framing");
                continue;
            };
            match ch {
                STDIN => {
                    if let Some(tx) = &stdin_tx {
                        if tx.send(data).await.is_err() {
                            stdin_tx = None;
                        }
                    }
                }
                RESIZE => {
                    for size in resize.push(&data) {
                        let _ = resize_tx.send(size).await;
                    }
                }
                CLOSE if proto == WsProtocol::V5 => {
                    if data.first() == Some(&STDIN) {
                        stdin_tx = None; // EOF for the process
                    }
                }
                other => debug!(channel = other, "websocket: ignoring a message"),
            }
        }
        // Client gone or closed: stdin ends, and the backend hangs up.
        let _ = gone_tx.send(true);
    });

    let result = cmd.run(backend.as_ref(), io).await;
    for p in pumps {
        let _ = p.await;
    }
    let msg = match (&result, proto.status_json()) {
        (Ok(code), true) => Some(status::exit_status_json(*code)),
        (Ok(code), false) => status::exit_status_text(*code),
        (Err(e), true) => Some(status::error_status_json(&e.to_string())),
        (Err(e), false) => Some(e.to_string()),
    };
    if let Some(msg) = msg {
        let _ = out_tx.send((ERROR, Bytes::from(msg))).await;
    }
    if let Err(e) = &result {
        warn!(error = %e, "websocket exec: backend failed");
    }
    drop(out_tx);
    if let Ok(Some(mut sink)) = writer.await {
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
                reason: "".into(),
            })))
            .await;
        let _ = sink.close().await;
    }
    reader.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        assert_eq!(
            WsProtocol::negotiate(["v4.channel.k8s.io", "v5.channel.k8s.io"]),
            Some(Some(WsProtocol::V5))
        );
        assert_eq!(
            WsProtocol::negotiate(["base64.channel.k8s.io, v4.base64.channel.k8s.io"]),
            Some(Some(WsProtocol::V4Base64))
        );
        assert_eq!(WsProtocol::negotiate([]), Some(None));
        assert_eq!(WsProtocol::negotiate(["chat"]), None);
    }

    #[test]
    fn framing() {
        let Message::Binary(b) = encode(WsProtocol::V5, STDOUT, b"hi") else {
            panic!()
        };
        assert_eq!(&b[..], b"\x01hi");
        let Message::Text(t) = encode(WsProtocol::V4Base64, STDERR, b"hi") else {
            panic!()
        };
        assert_eq!(t.as_str(), "2aGk=");
        assert_eq!(
            decode(WsProtocol::V1Base64, Message::Text("0aGk=".into())),
            Some((STDIN, Bytes::from_static(b"hi")))
        );
        assert_eq!(
            decode(WsProtocol::V1Base64, Message::Text("0!!".into())),
            None
        );
        assert_eq!(decode(WsProtocol::V4, Message::Binary(Bytes::new())), None);
    }
}
