//! Hostile clients, built from our own codec: malformed upgrades and frames, stale tokens,
//! clients that stall or skip flow control. The server must refuse or close them, and go
//! on serving others.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use husk_cri::streaming::server::{ServerConfig, StreamingServer};
use husk_cri::streaming::spdy::frame::{goaway, Frame, FrameDecoder, FrameEncoder, Headers};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::independent_clients::node;
use crate::local_backend::{echo_server, exec_req, server};

/// Sends an HTTP request and returns the status line and headers (up to the blank line),
/// leaving the connection positioned after them.
async fn http(addr: std::net::SocketAddr, req: &str) -> (TcpStream, String) {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b))
            .await
            .expect("server answers")
            .unwrap();
        if n == 0 {
            break;
        }
        head.push(b[0]);
    }
    (c, String::from_utf8_lossy(&head).into_owned())
}

fn spdy_upgrade(url: &str, proto: &str) -> String {
    let path = &url[url.find("/exec/").or(url.find("/portforward/")).unwrap()..];
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {proto}\r\n\r\n"
    )
}

/// Reads frames until the server closes; returns them.
async fn frames_until_close(c: &mut TcpStream) -> Vec<Frame> {
    let mut dec = FrameDecoder::new(1 << 20, 64 * 1024);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    loop {
        while let Ok(Some(f)) = dec.decode(&mut buf) {
            out.push(f);
        }
        let n = tokio::time::timeout(Duration::from_secs(5), c.read_buf(&mut buf))
            .await
            .expect("server closes the connection")
            .unwrap_or(0);
        if n == 0 {
            return out;
        }
    }
}

/// Reads frames until the server closes, asserts a GOAWAY with PROTOCOL_ERROR among them;
/// returns them.
async fn closed_with_protocol_error(c: &mut TcpStream) -> Vec<Frame> {
    let frames = frames_until_close(c).await;
    assert!(
        frames.iter().any(|f| matches!(
            f,
            Frame::GoAway {
                status: goaway::PROTOCOL_ERROR,
                ..
            }
        )),
        "{frames:?}"
    );
    frames
}

async fn still_serves(s: &StreamingServer) {
    let url = s.exec_url(exec_req("echo ok", false)).unwrap();
    let v = node(&["exec", &url, "v4.channel.k8s.io", "-"]).await;
    assert_eq!(v["stdout"], "ok\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_upgrade_gets_goaway_and_close() {
    let s = server(ServerConfig::default()).await;
    let url = s.exec_url(exec_req("sleep 30", false)).unwrap();
    let (mut c, head) = http(s.local_addr(), &spdy_upgrade(&url, "v4.channel.k8s.io")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head
        .to_ascii_lowercase()
        .contains("x-stream-protocol-version: v4.channel.k8s.io"));
    c.write_all(&[0xff; 64]).await.unwrap();
    closed_with_protocol_error(&mut c).await;
    still_serves(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_block_inflating_past_the_limit_closes_the_connection() {
    let s = server(ServerConfig::default()).await;
    let url = s.exec_url(exec_req("sleep 30", false)).unwrap();
    let (mut c, head) = http(s.local_addr(), &spdy_upgrade(&url, "v4.channel.k8s.io")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // 1 MiB of one header value compresses to about a kilobyte.
    let mut enc = FrameEncoder::new();
    let mut out = BytesMut::new();
    enc.encode(
        &Frame::SynStream {
            stream_id: 1,
            associated_id: 0,
            priority: 0,
            flags: 0,
            headers: Headers::new().with("streamtype", &"e".repeat(1 << 20)),
        },
        &mut out,
    )
    .unwrap();
    assert!(out.len() < 8192);
    c.write_all(&out).await.unwrap();
    let frames = closed_with_protocol_error(&mut c).await;
    assert!(!frames.iter().any(|f| matches!(f, Frame::SynReply { .. })));
    still_serves(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_token_is_refused_and_the_connection_closed() {
    let s = server(ServerConfig::default()).await;
    let url = s.exec_url(exec_req("echo once", false)).unwrap();
    let v = node(&["exec", &url, "v4.channel.k8s.io", "-"]).await;
    assert_eq!(v["stdout"], "once\n");
    let (mut c, head) = http(s.local_addr(), &spdy_upgrade(&url, "v4.channel.k8s.io")).await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
        .await
        .expect("connection closed after the refusal")
        .unwrap();
    still_serves(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_refused() {
    let s = server(ServerConfig {
        token_ttl: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let url = s.exec_url(exec_req("echo late", false)).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_c, head) = http(s.local_addr(), &spdy_upgrade(&url, "v4.channel.k8s.io")).await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_common_protocol_is_forbidden_and_no_upgrade_is_bad_request() {
    let s = server(ServerConfig::default()).await;
    let url = s.exec_url(exec_req("echo", false)).unwrap();
    let (_c, head) = http(s.local_addr(), &spdy_upgrade(&url, "v9.channel.k8s.io")).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");

    let url = s.exec_url(exec_req("echo", false)).unwrap();
    let path = &url[url.find("/exec/").unwrap()..];
    let (_c, head) = http(
        s.local_addr(),
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");

    let (_c, head) = http(s.local_addr(), "GET /exec/ HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    // Not HTTP at all: the connection is dropped, and the server goes on.
    let (_c, _head) = http(s.local_addr(), "\x16\x03\x01garbage\r\n\r\n").await;
    still_serves(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_in_flight_are_bounded_and_requests_validated() {
    let s = server(ServerConfig {
        max_in_flight: 2,
        ..Default::default()
    })
    .await;
    s.exec_url(exec_req("true", false)).unwrap();
    s.port_forward_url("p").unwrap();
    assert!(s.exec_url(exec_req("true", false)).is_err());

    let s = server(ServerConfig::default()).await;
    let mut r = exec_req("true", false);
    r.tty = true;
    assert!(s.exec_url(r).is_err(), "tty with stderr is refused");
    let mut r = exec_req("true", false);
    r.stdout = false;
    r.stderr = false;
    assert!(s.exec_url(r).is_err(), "no stream at all is refused");
    assert!(s.port_forward_url("").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_never_opens_its_streams_is_timed_out() {
    let s = server(ServerConfig {
        stream_timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let url = s.exec_url(exec_req("echo", false)).unwrap();
    let (mut c, head) = http(s.local_addr(), &spdy_upgrade(&url, "v4.channel.k8s.io")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let frames = frames_until_close(&mut c).await;
    assert!(
        frames.iter().any(|f| matches!(f, Frame::GoAway { .. })),
        "{frames:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_tunnelled_in_websocket() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let port = echo_server().await;
    let s = server(ServerConfig::default()).await;
    let url = s.port_forward_url("pod1").unwrap();
    let mut req = url
        .replace("http://", "ws://")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "SPDY/3.1+portforward.k8s.io".parse().unwrap(),
    );
    let tcp = TcpStream::connect(s.local_addr()).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    assert_eq!(
        resp.headers()["sec-websocket-protocol"],
        "SPDY/3.1+portforward.k8s.io"
    );
    // A SPDY client in binary messages: error and data streams for request 0, then data.
    let mut enc = FrameEncoder::new();
    let mut out = BytesMut::new();
    for (id, kind) in [(1, "error"), (3, "data")] {
        enc.encode(
            &Frame::SynStream {
                stream_id: id,
                associated_id: 0,
                priority: 0,
                flags: 0,
                headers: Headers::new()
                    .with("streamtype", kind)
                    .with("port", &port.to_string())
                    .with("requestid", "0"),
            },
            &mut out,
        )
        .unwrap();
    }
    enc.encode(
        &Frame::Data {
            stream_id: 3,
            flags: husk_cri::streaming::spdy::frame::FLAG_FIN,
            data: Bytes::from_static(b"through the tunnel"),
        },
        &mut out,
    )
    .unwrap();
    ws.send(Message::Binary(out.to_vec().into())).await.unwrap();
    let mut dec = FrameDecoder::new(1 << 20, 64 * 1024);
    let mut buf = BytesMut::new();
    let mut echoed = Vec::new();
    'outer: loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo within 5 s")
            .unwrap()
            .unwrap();
        if let Message::Binary(b) = msg {
            buf.extend_from_slice(&b);
        }
        while let Some(f) = dec.decode(&mut buf).unwrap() {
            if let Frame::Data {
                stream_id: 3,
                flags,
                data,
            } = f
            {
                echoed.extend_from_slice(&data);
                if flags & husk_cri::streaming::spdy::frame::FLAG_FIN != 0 {
                    break 'outer;
                }
            }
        }
    }
    assert_eq!(echoed, b"through the tunnel");
}

/// A client that behaves like Go's spdystream (kubectl, crictl): no SETTINGS, never a
/// WINDOW_UPDATE, streams opened in kubectl's order. 300 KiB of output must arrive whole
/// (far past the 64 KiB initial window), then stdout's FIN, then the Status, then GOAWAY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_style_client_without_flow_control_gets_all_output() {
    use husk_cri::streaming::spdy::frame::FLAG_FIN;
    let s = server(ServerConfig::default()).await;
    let url = s
        .exec_url(exec_req("head -c 307200 /dev/zero; exit 4", false))
        .unwrap();
    let (mut c, head) = http(s.local_addr(), &spdy_upgrade(&url, "v4.channel.k8s.io")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut enc = FrameEncoder::new();
    let mut out = BytesMut::new();
    // Stream 3, stdin, was not asked for by the exec request: it must be refused.
    for (id, kind) in [(1, "error"), (3, "stdin"), (5, "stdout"), (7, "stderr")] {
        enc.encode(
            &Frame::SynStream {
                stream_id: id,
                associated_id: 0,
                priority: 0,
                flags: 0,
                headers: Headers::new().with("streamType", kind),
            },
            &mut out,
        )
        .unwrap();
    }
    c.write_all(&out).await.unwrap();
    // Like kubectl, close our side once the status is in (the server lingers for it).
    let mut dec = FrameDecoder::new(1 << 20, 64 * 1024);
    let mut buf = BytesMut::new();
    let (mut stdout, mut stdout_fin, mut status) = (0usize, false, Vec::new());
    let mut order = Vec::new();
    let mut done = false;
    let mut refused = false;
    while !done {
        let n = tokio::time::timeout(Duration::from_secs(10), c.read_buf(&mut buf))
            .await
            .expect("frames keep coming")
            .unwrap();
        assert!(n > 0, "server closed before the status");
        while let Some(f) = dec.decode(&mut buf).unwrap() {
            match f {
                Frame::Data {
                    stream_id: 5,
                    flags,
                    data,
                } => {
                    stdout += data.len();
                    if flags & FLAG_FIN != 0 {
                        stdout_fin = true;
                        order.push("stdout-fin");
                    }
                }
                Frame::Data {
                    stream_id: 1,
                    flags,
                    data,
                } => {
                    status.extend_from_slice(&data);
                    if flags & FLAG_FIN != 0 {
                        order.push("error-fin");
                    }
                }
                Frame::GoAway { .. } => {
                    order.push("goaway");
                    done = true;
                }
                Frame::RstStream {
                    stream_id: 3,
                    status,
                } => {
                    assert_eq!(status, 3, "REFUSED_STREAM");
                    refused = true;
                }
                _ => {}
            }
        }
    }
    assert!(refused, "the unrequested stdin stream was refused");
    assert_eq!(stdout, 307_200);
    assert!(stdout_fin);
    assert_eq!(order, ["stdout-fin", "error-fin", "goaway"]);
    let st: serde_json::Value = serde_json::from_slice(&status).unwrap();
    assert_eq!(st["details"]["causes"][0]["message"], "4");
}
