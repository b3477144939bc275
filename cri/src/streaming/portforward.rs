//! Port-forward over SPDY (`portforward.k8s.io`, kubelet's `portforward.httpStreamHandler`).
//!
//! For each local connection the client opens two streams with the same `requestid`
//! header: `error` and `data`, both naming the `port`. Once both are there we connect to
//! the port in the pod (through the backend), copy bytes both ways on the data stream, and
//! report failures as text on the error stream. One SPDY connection carries any number of
//! such pairs until the client closes it; a pair left incomplete past the stream timeout
//! is reset.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};

use super::backend::StreamBackend;
use super::spdy::frame::rst;
use super::spdy::{Session, Stream};

pub const PROTOCOL: &str = "portforward.k8s.io";

#[derive(Default)]
struct Pending {
    error: Option<Stream>,
    data: Option<Stream>,
    since: Option<tokio::time::Instant>,
}

/// The pairing key: the `requestid` header, or, for clients too old to send it, kubelet's
/// best-effort guess from the stream ids (error stream id, data stream id - 2).
fn request_id(st: &Stream, kind: &str) -> String {
    match st.headers.get("requestid") {
        Some(id) if !id.is_empty() => id.to_string(),
        _ if kind == "data" => st.id.saturating_sub(2).to_string(),
        _ => st.id.to_string(),
    }
}

/// Serves port-forwarding on an upgraded SPDY session until the client closes it.
pub async fn serve_spdy(
    mut session: Session,
    pod_sandbox_id: String,
    backend: Arc<dyn StreamBackend>,
    stream_timeout: Duration,
) {
    let mut pending: HashMap<String, Pending> = HashMap::new();
    let mut sweep = tokio::time::interval(Duration::from_millis(500));
    loop {
        let st = tokio::select! {
            st = session.accept() => match st {
                Some(st) => st,
                None => break,
            },
            _ = sweep.tick() => {
                let now = tokio::time::Instant::now();
                let expired: Vec<String> = pending
                    .iter()
                    .filter(|(_, p)| p.since.is_some_and(|t| now - t > stream_timeout))
                    .map(|(k, _)| k.clone())
                    .collect();
                for id in expired {
                    warn!(request_id = %id, "portforward: stream pair incomplete, resetting");
                    if let Some(p) = pending.remove(&id) {
                        for st in [p.error, p.data].into_iter().flatten() {
                            let _ = st.writer.reset(rst::CANCEL).await;
                        }
                    }
                }
                continue;
            }
        };
        let kind = st.headers.get("streamtype").unwrap_or("").to_string();
        if kind != "error" && kind != "data" {
            warn!(stream_type = %kind, "portforward: refusing a stream of unknown type");
            let _ = st.writer.reset(rst::PROTOCOL_ERROR).await;
            continue;
        }
        let id = request_id(&st, &kind);
        let p = pending.entry(id.clone()).or_default();
        p.since.get_or_insert_with(tokio::time::Instant::now);
        let slot = if kind == "error" {
            &mut p.error
        } else {
            &mut p.data
        };
        if slot.is_some() {
            warn!(request_id = %id, stream_type = %kind, "portforward: duplicate stream");
            let _ = st.writer.reset(rst::PROTOCOL_ERROR).await;
            continue;
        }
        *slot = Some(st);
        if p.error.is_some() && p.data.is_some() {
            let p = pending.remove(&id).expect("just seen");
            let (error, data) = (p.error.expect("paired"), p.data.expect("paired"));
            tokio::spawn(forward(
                error,
                data,
                pod_sandbox_id.clone(),
                backend.clone(),
            ));
        }
    }
    debug!("portforward: client closed the connection");
    session.close().await;
}

async fn forward(error: Stream, data: Stream, pod: String, backend: Arc<dyn StreamBackend>) {
    let port_header = data.headers.get("port").unwrap_or("").to_string();
    let port = match port_header.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => {
            let msg = format!("invalid port {port_header:?}");
            let _ = error.writer.write_all(msg.as_bytes()).await;
            let _ = error.writer.finish().await;
            let _ = data.writer.reset(rst::CANCEL).await;
            return;
        }
    };
    let conn = match backend.port_forward(&pod, port).await {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("error forwarding port {port} to pod {pod}: {e}");
            debug!("portforward: {msg}");
            let _ = error.writer.write_all(msg.as_bytes()).await;
            let _ = error.writer.finish().await;
            let _ = data.writer.finish().await;
            return;
        }
    };
    let (mut rd, mut wr) = tokio::io::split(conn);
    let Stream {
        reader: mut client_rx,
        writer: client_tx,
        ..
    } = data;
    // client -> pod; the client's FIN half-closes the pod connection.
    let up = async move {
        while let Some(b) = client_rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    };
    // pod -> client; the pod's EOF FINs the data stream.
    let down = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    if client_tx.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let msg = format!("error reading from port {port} in pod {pod}: {e}");
                    let _ = error.writer.write_all(msg.as_bytes()).await;
                    break;
                }
            }
        }
        let _ = client_tx.finish().await;
    };
    // Done when the pod side has ended; the upload half may still be waiting on a client
    // that never FINs, and is dropped with it.
    let up = tokio::spawn(up);
    down.await;
    up.abort();
    let _ = error.writer.finish().await;
}
