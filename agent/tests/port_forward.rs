//! The agent's port-forward service on a Unix socket (in the guest it is vsock port 1025),
//! driven by the host's client (`husk_agent_client::port_forward`): connections reach a
//! server in the pod's network namespace, with half-close both ways; refused ports and bad
//! requests are answered with an error line, never a hang. Guest mode (the agent's own
//! namespace is the pod's, as in the VM) and host mode (the sandbox's namespace, entered
//! for the connect). Needs root, util-linux's unshare and busybox.

mod common;

use std::time::{Duration, Instant};

use common::*;
use husk_agent_client::port_forward::{request, PortForwardError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Opens a forwarded connection to `port`, or the agent's refusal.
async fn forward(a: &TestAgent, port: u16) -> Result<UnixStream, PortForwardError> {
    let mut s = UnixStream::connect(a.port_forward_socket()).await.unwrap();
    request(&mut s, port).await?;
    Ok(s)
}

/// Echoes through `nc -e cat` in the pod: what we send comes back, and our half-close
/// reaches the server (cat exits at EOF, so the connection ends).
async fn echo(a: &TestAgent, port: u16, payload: &[u8]) {
    let mut s = forward(a, port).await.expect("forward");
    s.write_all(payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut back))
        .await
        .expect("the pod side ends after our half-close")
        .unwrap();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload);
}

async fn exercise(a: &TestAgent) {
    // An echo server in the pod's network namespace.
    a.run(
        "echo",
        &spec(&["nc", "-ll", "-p", "7000", "-e", "/bin/cat"]),
    )
    .await;
    // Until nc listens, connects are refused.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match forward(a, 7000).await {
            Ok(_) => break,
            Err(PortForwardError::Refused(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("forward to the echo server: {e}"),
        }
    }
    echo(a, 7000, b"hello through the agent").await;
    // Several at once, one larger than the socket buffers.
    let big: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let runs = (0..5).map(|i| {
        let payload = if i == 0 {
            big.clone()
        } else {
            format!("conn {i}").into_bytes()
        };
        async move { echo(a, 7000, &payload).await }
    });
    futures_util::future::join_all(runs).await;

    // Nothing listens: an error line, at once.
    let t = Instant::now();
    match forward(a, 7001).await {
        Err(PortForwardError::Refused(m)) => {
            assert!(m.contains("refused"), "{m}");
            assert!(m.contains("7001"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Bad requests.
    for bad in [
        &b"PORT 0\n"[..],
        b"PORT 70000\n",
        b"GET / HTTP/1.0\n",
        &[b'9'; 100],
    ] {
        let mut s = UnixStream::connect(a.port_forward_socket()).await.unwrap();
        s.write_all(bad).await.unwrap();
        // Read to the end or to a reset: the agent closes with the rest of a too-long
        // request unread, which a Unix socket reports to us as ECONNRESET after the answer.
        let mut answer = Vec::new();
        let read = async {
            let mut b = [0u8; 256];
            while let Ok(n @ 1..) = s.read(&mut b).await {
                answer.extend_from_slice(&b[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("answered and closed");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("ERR "), "{bad:?}: {answer}");
    }
    a.remove("echo").await;
}

#[tokio::test]
async fn guest_mode_forwards_into_the_agents_namespace() {
    if !can_run() {
        return;
    }
    let a = TestAgent::start_guest("pf-guest").await;
    a.create_sandbox("pf-guest", false).await;
    exercise(&a).await;
    a.shutdown().await;
}

#[tokio::test]
async fn host_mode_forwards_into_the_sandbox_namespace() {
    if !can_run() {
        return;
    }
    let a = TestAgent::start("pf-host").await;
    // Before CreateSandbox there is no pod network to connect in.
    match forward(&a, 7000).await {
        Err(PortForwardError::Refused(m)) => assert!(m.contains("sandbox"), "{m}"),
        other => panic!("{other:?}"),
    }
    a.create_sandbox("pf-host", false).await;
    // Host mode leaves the sandbox namespace's loopback as a new namespace has it: down.
    let ns = a.state_dir().join("sandbox/netns");
    let st = std::process::Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args(["ip", "link", "set", "lo", "up"])
        .status()
        .unwrap();
    assert!(st.success());
    exercise(&a).await;
    a.shutdown().await;
}
