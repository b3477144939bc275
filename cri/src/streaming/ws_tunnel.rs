//! Port-forward over WebSocket: kubectl (1.30+) tunnels the SPDY port-forward protocol in
//! binary WebSocket messages under the sub-protocol `SPDY/3.1+portforward.k8s.io`
//! (apimachinery's `tunneling` package). Here the WebSocket becomes a byte stream again,
//! and the ordinary SPDY session and port-forward handler run on it.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::backend::StreamBackend;
use super::portforward;
use super::spdy::{Session, SessionConfig};
use super::websocket::ws_config;

pub const PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";

/// Serves port-forwarding on an upgraded WebSocket connection until the client closes it.
pub async fn serve_port_forward<IO>(
    io: IO,
    pod_sandbox_id: String,
    backend: Arc<dyn StreamBackend>,
    session: SessionConfig,
    stream_timeout: Duration,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config())).await;
    let (mut sink, mut source) = ws.split();
    // The SPDY session reads and writes one end of an in-memory pipe; two pumps carry the
    // other end's bytes in and out of WebSocket messages.
    let (spdy_side, pump_side) = tokio::io::duplex(256 * 1024);
    let (mut from_spdy, mut to_spdy) = tokio::io::split(pump_side);
    let inbound = tokio::spawn(async move {
        while let Some(Ok(msg)) = source.next().await {
            match msg {
                Message::Binary(b) if to_spdy.write_all(&b).await.is_err() => break,
                Message::Close(_) => break,
                // text has no meaning here; pings are answered by tungstenite
                _ => {}
            }
        }
        let _ = to_spdy.shutdown().await;
    });
    let outbound = tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match from_spdy.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink
                        .send(Message::Binary(buf[..n].to_vec().into()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = sink.close().await;
    });
    let session = Session::start(spdy_side, session);
    portforward::serve_spdy(session, pod_sandbox_id, backend, stream_timeout).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), outbound).await;
    inbound.abort();
}
