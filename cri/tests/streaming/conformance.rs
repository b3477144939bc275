//! The protocols against the independent clients: SPDY/3.1 exec, attach and port-forward
//! with node's spdy-transport, channel.k8s.io exec over WebSocket with Python's websockets.

use husk_cri::streaming::backend::AttachRequest;
use husk_cri::streaming::server::ServerConfig;

use crate::independent_clients::{node, python, status};
use crate::local_backend::{echo_server, exec_req, server};

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
