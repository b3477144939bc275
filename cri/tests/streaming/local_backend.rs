//! The server side of these tests: huskd's streaming server on a backend that runs local
//! processes (`sh -c`) and forwards ports to a local TCP echo server.

use std::process::Stdio;
use std::sync::Arc;

use bytes::Bytes;
use husk_cri::streaming::backend::{
    AttachRequest, BackendError, ExecIo, ExecRequest, PortStream, StreamBackend,
};
use husk_cri::streaming::server::{ServerConfig, StreamingServer};
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

pub async fn server(cfg: ServerConfig) -> StreamingServer {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    StreamingServer::start(cfg, Arc::new(LocalBackend))
        .await
        .unwrap()
}

pub fn exec_req(cmd: &str, stdin: bool) -> ExecRequest {
    ExecRequest {
        container_id: "c1".into(),
        cmd: vec!["sh".into(), "-c".into(), cmd.into()],
        tty: false,
        stdin,
        stdout: true,
        stderr: true,
    }
}

pub async fn echo_server() -> u16 {
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
