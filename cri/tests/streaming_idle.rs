//! 1000 idle connections to the streaming server (a client that connects and never sends
//! its request, a thousand times over): the server keeps answering others meanwhile, and
//! closes every idle one at its header-read timeout, so they cost it nothing for long.

use std::sync::Arc;
use std::time::{Duration, Instant};

use husk_cri::streaming::backend::{
    AttachRequest, BackendError, ExecIo, ExecRequest, PortStream, StreamBackend,
};
use husk_cri::streaming::server::{ServerConfig, StreamingServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A backend that is never reached: no request here gets past the HTTP layer.
struct Unreachable;

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

impl StreamBackend for Unreachable {
    fn exec(&self, _: ExecRequest, _: ExecIo) -> BoxFuture<'_, Result<i32, BackendError>> {
        Box::pin(async { Err(BackendError::Failed("unreachable".into())) })
    }
    fn attach(&self, _: AttachRequest, _: ExecIo) -> BoxFuture<'_, Result<i32, BackendError>> {
        Box::pin(async { Err(BackendError::Failed("unreachable".into())) })
    }
    fn port_forward(
        &self,
        _: &str,
        _: u16,
    ) -> BoxFuture<'_, Result<Box<dyn PortStream>, BackendError>> {
        Box::pin(async { Err(BackendError::Failed("unreachable".into())) })
    }
}

/// Both ends of 1000 connections live in this process: lift the soft descriptor limit.
fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, initialized rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        r.rlim_cur = r.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &r), 0);
    }
    assert!(
        r.rlim_cur >= 4096,
        "RLIMIT_NOFILE hard limit {} < 4096",
        r.rlim_max
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_are_closed_and_others_still_served() {
    raise_nofile();
    let s = StreamingServer::start(ServerConfig::default(), Arc::new(Unreachable))
        .await
        .unwrap();
    let addr = s.local_addr();
    let t0 = Instant::now();
    let mut idle = Vec::with_capacity(1000);
    for _ in 0..1000 {
        idle.push(
            TcpStream::connect(addr)
                .await
                .expect("connect an idle client"),
        );
    }
    // Another client is answered at once: a bad token, refused with an HTTP error.
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /exec/no-such-token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut answer))
        .await
        .expect("an answer while 1000 clients idle")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    // Each idle one is closed by the server (EOF or a reset, perhaps after a 408).
    let mut closed = 0;
    for mut c in idle {
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut buf)).await;
        assert!(
            r.is_ok(),
            "an idle connection still open after {:?}",
            t0.elapsed()
        );
        closed += 1;
    }
    assert_eq!(closed, 1000);
    assert!(t0.elapsed() < Duration::from_secs(40), "{:?}", t0.elapsed());
}
