//! Reaching the agent's ttrpc services: on its socket, and through a hybrid-vsock CONNECT
//! handshake.

use husk_proto::agent as pb;

use crate::common::*;

#[tokio::test]
async fn health_and_version() {
    if !can_run() {
        return;
    }
    let a = TestAgent::start("health").await;
    let r = a
        .health
        .check(ctx(), &pb::CheckRequest::new())
        .await
        .unwrap();
    assert_eq!(r.status, pb::check_response::ServingStatus::SERVING.into());
    let v = a
        .health
        .version(ctx(), &pb::CheckRequest::new())
        .await
        .unwrap();
    assert_eq!(v.api_version, husk_proto::AGENT_API_VERSION);
    a.shutdown().await;
}

/// The recipe the proto documents for hybrid vsock works: CONNECT handshake on a stream, then
/// ttrpc over the same stream. A tiny stand-in for the VMM's vsock device forwards to the
/// agent's socket.
#[tokio::test]
async fn ttrpc_over_a_hybrid_vsock_style_stream() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{UnixListener, UnixStream};
    if !can_run() {
        return;
    }
    let a = TestAgent::start("hybrid").await;
    let agent_sock = a.dir.path().join("agent.sock");
    let vsock = a.dir.path().join("vm.vsock");
    let listener = UnixListener::bind(&vsock).unwrap();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let mut s = BufReader::new(s);
        let mut line = String::new();
        s.read_line(&mut line).await.unwrap();
        assert_eq!(line, format!("CONNECT {}\n", husk_proto::AGENT_VSOCK_PORT));
        s.get_mut().write_all(b"OK 1073741824\n").await.unwrap();
        let mut up = UnixStream::connect(&agent_sock).await.unwrap();
        let mut down = s.into_inner();
        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
    });

    let s = UnixStream::connect(&vsock).await.unwrap();
    let mut s = BufReader::new(s);
    s.get_mut()
        .write_all(format!("CONNECT {}\n", husk_proto::AGENT_VSOCK_PORT).as_bytes())
        .await
        .unwrap();
    let mut ok = String::new();
    s.read_line(&mut ok).await.unwrap();
    assert!(ok.starts_with("OK "), "{ok}");
    // Nothing follows OK before we speak, so the buffered reader holds no ttrpc bytes.
    let stream = s.into_inner();
    let client = ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::from(stream));
    let health = husk_proto::agent_ttrpc::HealthClient::new(client);
    let r = health
        .check(ctx(), &pb::CheckRequest::new())
        .await
        .expect("Check over hybrid vsock");
    assert_eq!(r.status, pb::check_response::ServingStatus::SERVING.into());
    a.shutdown().await;
}
