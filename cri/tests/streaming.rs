//! huskd's streaming server against independent clients: node's spdy-transport (SPDY/3.1
//! exec and port-forward) and Python's websockets (channel.k8s.io v4/v5 exec), plus
//! hostile clients built from our own codec. The backend runs local processes (`sh -c`)
//! and dials a local TCP echo server: this tests the protocols, not the VM.
//!
//! The clients come from scripts/setup-stream-clients (run by scripts/setup); a missing
//! client fails these tests, it never skips them.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use husk_cri::streaming::backend::{
    AttachRequest, BackendError, ExecIo, ExecRequest, PortStream, StreamBackend,
};
use husk_cri::streaming::server::{ServerConfig, StreamingServer};
use husk_cri::streaming::spdy::frame::{goaway, Frame, FrameDecoder, FrameEncoder, Headers};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Runs commands on the host (tests only) and forwards ports to 127.0.0.1.
struct LocalBackend;

async fn run_local(cmd: Vec<String>, io: ExecIo) -> Result<i32, BackendError> {
    let mut c = tokio::process::Command::new(&cmd[0]);
    c.args(&cmd[1..])
        .stdin(if io.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = c.spawn().map_err(|e| BackendError::Failed(e.to_string()))?;
    let mut tasks = Vec::new();
    let mut stdin_task = None;
    if let (Some(mut rx), Some(mut w)) = (io.stdin, child.stdin.take()) {
        stdin_task = Some(tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                if w.write_all(&b).await.is_err() {
                    break;
                }
            }
        }));
    }
    for (r, tx) in [
        (
            child
                .stdout
                .take()
                .map(|r| Box::new(r) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            io.stdout,
        ),
        (
            child
                .stderr
                .take()
                .map(|r| Box::new(r) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            io.stderr,
        ),
    ] {
        let Some(mut r) = r else { continue };
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if let Some(tx) = &tx {
                            let _ = tx.send(Bytes::copy_from_slice(&buf[..n])).await;
                        }
                    }
                }
            }
        }));
    }
    let status = child
        .wait()
        .await
        .map_err(|e| BackendError::Failed(e.to_string()))?;
    // Output first (the pumps end at the pipes' EOF); stdin's pump may wait on a client
    // that never closes stdin, and goes with the process.
    for t in tasks {
        let _ = t.await;
    }
    if let Some(t) = stdin_task {
        t.abort();
    }
    Ok(status.code().unwrap_or(128))
}

impl StreamBackend for LocalBackend {
    fn exec(&self, req: ExecRequest, mut io: ExecIo) -> BoxFuture<'_, Result<i32, BackendError>> {
        if req.tty {
            // No pty here: a tty exec reports the first terminal size it is sent, which is
            // what the resize channel is for.
            return Box::pin(async move {
                let size = io.resize.as_mut().unwrap().recv().await.unwrap();
                let msg = format!("{}x{}", size.width, size.height);
                io.stdout.unwrap().send(msg.into()).await.unwrap();
                Ok(0)
            });
        }
        Box::pin(run_local(req.cmd, io))
    }

    fn attach(&self, _req: AttachRequest, io: ExecIo) -> BoxFuture<'_, Result<i32, BackendError>> {
        Box::pin(run_local(vec!["cat".into()], io))
    }

    fn port_forward(
        &self,
        _pod: &str,
        port: u16,
    ) -> BoxFuture<'_, Result<Box<dyn PortStream>, BackendError>> {
        Box::pin(async move {
            let s = TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(|e| BackendError::Failed(e.to_string()))?;
            Ok(Box::new(s) as Box<dyn PortStream>)
        })
    }
}

async fn server(cfg: ServerConfig) -> StreamingServer {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    StreamingServer::start(cfg, Arc::new(LocalBackend))
        .await
        .unwrap()
}

fn exec_req(cmd: &str, stdin: bool) -> ExecRequest {
    ExecRequest {
        container_id: "c1".into(),
        cmd: vec!["sh".into(), "-c".into(), cmd.into()],
        tty: false,
        stdin,
        stdout: true,
        stderr: true,
    }
}

fn clients_dir() -> PathBuf {
    let root = std::env::var("HUSK_CACHE").unwrap_or_else(|_| "/var/cache/husk".into());
    PathBuf::from(root).join("stream-clients")
}

/// Runs a client script and parses its JSON; panics (fails the test) if the client is not
/// installed or fails.
async fn run_client(
    program: PathBuf,
    script: &str,
    args: &[&str],
    env: &[(&str, PathBuf)],
) -> serde_json::Value {
    assert!(
        program.exists(),
        "{} is missing: run scripts/setup-stream-clients (scripts/setup does)",
        program.display()
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(script);
    let mut c = tokio::process::Command::new(&program);
    c.arg(&script).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), c.output())
        .await
        .expect("client finishes in 30 s")
        .unwrap();
    assert!(
        out.status.success(),
        "{} failed: {}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "client printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

async fn node(args: &[&str]) -> serde_json::Value {
    let module = clients_dir().join("node/node_modules/spdy-transport");
    assert!(
        module.join("package.json").exists(),
        "spdy-transport is missing from {}: run scripts/setup-stream-clients",
        module.display()
    );
    run_client(
        PathBuf::from("/usr/bin/node"),
        "spdy_client.js",
        args,
        &[("SPDY_TRANSPORT", module)],
    )
    .await
}

async fn python(args: &[&str]) -> serde_json::Value {
    run_client(
        clients_dir().join("venv/bin/python"),
        "ws_client.py",
        args,
        &[],
    )
    .await
}

fn status(v: &serde_json::Value) -> serde_json::Value {
    serde_json::from_str(v["error"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("error stream is not a Status ({e}): {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_spdy_exec_stdin_stdout_stderr_and_exit_code() {
    let s = server(ServerConfig::default()).await;
    let url = s
        .exec_url(exec_req("cat; echo oops >&2; exit 3", true))
        .unwrap();
    let v = node(&["exec", &url, "v4.channel.k8s.io", "hello from node"]).await;
    assert_eq!(v["protocol"], "v4.channel.k8s.io");
    assert_eq!(v["stdout"], "hello from node");
    assert_eq!(v["stderr"], "oops\n");
    let st = status(&v);
    assert_eq!(st["status"], "Failure");
    assert_eq!(st["reason"], "NonZeroExitCode");
    assert_eq!(st["details"]["causes"][0]["reason"], "ExitCode");
    assert_eq!(st["details"]["causes"][0]["message"], "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_spdy_exec_large_output_under_flow_control() {
    // spdy-transport does SPDY/3.1 flow control (a 1 MiB stream window, then
    // WINDOW_UPDATEs): 3 MiB of stdout must flow on its updates without stalling. (It does
    // not police overruns, so that the send window is never exceeded is proven by the
    // session's own test, `send_window_is_honoured_once_the_peer_does_flow_control`.)
    let s = server(ServerConfig::default()).await;
    let url = s
        .exec_url(exec_req("head -c 3145728 /dev/zero | tr '\\0' a", false))
        .unwrap();
    let v = node(&["exec", &url, "v4.channel.k8s.io", "-"]).await;
    assert_eq!(v["stdout_len"], 3 * 1_048_576);
    assert!(v["stdout"].as_str().unwrap().bytes().all(|b| b == b'a'));
    assert_eq!(status(&v)["status"], "Success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_spdy_exec_v2_reports_errors_as_text() {
    let s = server(ServerConfig::default()).await;
    let url = s.exec_url(exec_req("echo out; exit 5", false)).unwrap();
    let v = node(&["exec", &url, "v2.channel.k8s.io", "-"]).await;
    assert_eq!(v["protocol"], "v2.channel.k8s.io");
    assert_eq!(v["stdout"], "out\n");
    let e = v["error"].as_str().unwrap();
    assert!(e.contains("non-zero exit code") && e.contains('5'), "{e}");
}

async fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_spdy_port_forward_three_connections() {
    let port = echo_server().await;
    let s = server(ServerConfig::default()).await;
    let url = s.port_forward_url("pod1").unwrap();
    let v = node(&["portforward", &url, &port.to_string(), "ping", "3"]).await;
    assert_eq!(
        v["echoes"],
        serde_json::json!(["ping-0", "ping-1", "ping-2"])
    );
    assert_eq!(v["errors"], serde_json::json!(["", "", ""]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_spdy_port_forward_to_a_closed_port_reports_on_the_error_stream() {
    // A port nothing listens on: bind then drop.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let s = server(ServerConfig::default()).await;
    let url = s.port_forward_url("pod1").unwrap();
    let v = node(&["portforward", &url, &port.to_string(), "x", "1"]).await;
    let e = v["errors"][0].as_str().unwrap();
    assert!(e.contains(&format!("error forwarding port {port}")), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websocket_v5_exec_with_stdin_close() {
    let s = server(ServerConfig::default()).await;
    let url = s.exec_url(exec_req("cat; echo done >&2", true)).unwrap();
    // `cat` ends only if the v5 close message for stdin arrives.
    let v = python(&[&url, "v5.channel.k8s.io", "hello from python"]).await;
    assert_eq!(v["protocol"], "v5.channel.k8s.io");
    assert_eq!(v["stdout"], "hello from python");
    assert_eq!(v["stderr"], "done\n");
    assert_eq!(status(&v)["status"], "Success");
}

/// The client's `session` mode (used against real pods in the lab): input sent step by
/// step, each answer awaited before the next, then stdin's end and the exit code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_spdy_interactive_session_answers_step_by_step() {
    let s = server(ServerConfig::default()).await;
    let url = s
        .exec_url(exec_req(
            "while read l; do echo got:$l; done; echo bye >&2; exit 4",
            true,
        ))
        .unwrap();
    let steps = serde_json::json!([
        {"send": "one\n"}, {"expect": "got:one"},
        {"send": "two\n"}, {"expect": "got:two"},
        {"end": true}
    ])
    .to_string();
    let v = node(&[
        "session",
        &url,
        "v4.channel.k8s.io",
        "stdin,stdout,stderr",
        &steps,
    ])
    .await;
    assert_eq!(v["stdout"], "got:one\ngot:two\n");
    assert_eq!(v["stderr"], "bye\n");
    assert_eq!(status(&v)["details"]["causes"][0]["message"], "4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websocket_v4_exec_exit_code() {
    let s = server(ServerConfig::default()).await;
    let url = s.exec_url(exec_req("echo out; exit 7", false)).unwrap();
    let v = python(&[&url, "v4.channel.k8s.io", "-"]).await;
    assert_eq!(v["protocol"], "v4.channel.k8s.io");
    assert_eq!(v["stdout"], "out\n");
    assert_eq!(status(&v)["details"]["causes"][0]["message"], "7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websocket_base64_exec() {
    let s = server(ServerConfig::default()).await;
    let url = s
        .exec_url(exec_req("printf '\\001\\002bin'; exit 2", false))
        .unwrap();
    let v = python(&[&url, "v4.base64.channel.k8s.io", "-"]).await;
    assert_eq!(v["protocol"], "v4.base64.channel.k8s.io");
    assert_eq!(v["stdout"], "\u{1}\u{2}bin");
    assert_eq!(status(&v)["details"]["causes"][0]["message"], "2");
}

// ---- hostile clients, from our own codec ----

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
    let frames = frames_until_close(&mut c).await;
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
    let frames = frames_until_close(&mut c).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_spdy_attach() {
    let s = server(ServerConfig::default()).await;
    let url = s
        .attach_url(AttachRequest {
            container_id: "c1".into(),
            tty: false,
            stdin: true,
            stdout: true,
            stderr: true,
        })
        .unwrap();
    assert!(url.contains("/attach/"), "{url}");
    let v = node(&["exec", &url, "v4.channel.k8s.io", "attached"]).await;
    assert_eq!(v["stdout"], "attached");
    assert_eq!(status(&v)["status"], "Success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websocket_tty_resize_reaches_the_backend() {
    let s = server(ServerConfig::default()).await;
    let mut req = exec_req("sh", false);
    req.tty = true;
    req.stderr = false;
    let url = s.exec_url(req).unwrap();
    let v = python(&[
        &url,
        "v5.channel.k8s.io",
        "-",
        r#"{"Width":132,"Height":43}"#,
    ])
    .await;
    assert_eq!(v["stdout"], "132x43");
    assert_eq!(status(&v)["status"], "Success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_spdy_tty_exec_resize_stream_reaches_the_backend() {
    let s = server(ServerConfig::default()).await;
    let mut req = exec_req("sh", false);
    req.tty = true;
    req.stderr = false;
    let url = s.exec_url(req).unwrap();
    let v = node(&[
        "exec-tty",
        &url,
        "v4.channel.k8s.io",
        r#"{"Width":100,"Height":30}"#,
    ])
    .await;
    assert_eq!(v["stdout"], "100x30");
    assert_eq!(status(&v)["status"], "Success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_spdy_exec_large_stdin_needs_our_window_updates() {
    // spdy-transport never sends past its send windows (64 KiB per stream and for the
    // session, as we announce no other): 1 MiB of stdin gets through only if our
    // WINDOW_UPDATEs give the windows back.
    let s = server(ServerConfig::default()).await;
    let url = s.exec_url(exec_req("wc -c", true)).unwrap();
    let v = node(&["exec", &url, "v4.channel.k8s.io", "@1048576"]).await;
    assert_eq!(v["stdout"].as_str().unwrap().trim(), "1048576");
    assert_eq!(status(&v)["status"], "Success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_spdy_port_forward_invalid_port_is_reported() {
    let s = server(ServerConfig::default()).await;
    let url = s.port_forward_url("pod1").unwrap();
    let v = node(&["portforward", &url, "0", "x", "1"]).await;
    let e = v["errors"][0].as_str().unwrap();
    assert!(e.contains("invalid port"), "{e}");
    assert_eq!(v["echoes"][0], "");
}
