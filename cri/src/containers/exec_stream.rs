//! Exec for the streaming server (CRI Exec's URL), as containerd's CRI plugin runs it: the
//! shim's Exec with FIFOs for the streams the client asked for (a stdin FIFO huskd writes
//! the client's input into; with a tty, a terminal in the guest and stdout only, as
//! containerd gives no stderr then), Start, resizes to the shim's ResizePty, Wait; then
//! the output drained, the exec Deleted and every FIFO removed, whatever happened.
//!
//! When the client's stdin ends (its EOF, or the client went away, which the streaming
//! server reports the same way): without a tty the FIFO's write end is closed and the
//! process reads EOF after every byte sent (the shim forwards the FIFO's EOF in order; a
//! CloseIO on top would abort its pump mid-copy, so none is sent). With a tty that is a
//! terminal hang-up: the process gets SIGHUP, and SIGKILL if it is still there
//! [`HANGUP_GRACE`] later, as containerd kills a tty exec whose stream is gone. A tty exec
//! without stdin hangs up when its resize stream ends (the client is gone).

use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{io_err, new_id, with_tty, ContainerError, Containers};
use crate::logs;
use crate::shim_client::{ExecStdio, Shim};

/// After the process is gone, how long its output may take to reach EOF.
const DRAIN: Duration = Duration::from_secs(10);
/// After SIGHUP to a hung-up tty exec, how long before SIGKILL.
pub const HANGUP_GRACE: Duration = Duration::from_secs(5);

/// A process's streams as the client's channels (each present only if asked for).
/// `resize` carries (width, height).
pub struct ProcessStreams {
    pub stdin: Option<mpsc::Receiver<Bytes>>,
    pub stdout: Option<mpsc::Sender<Bytes>>,
    pub stderr: Option<mpsc::Sender<Bytes>>,
    pub resize: Option<mpsc::Receiver<(u16, u16)>>,
    /// True once the client's connection is gone (see `streaming::backend::ExecIo`).
    pub gone: tokio::sync::watch::Receiver<bool>,
}

impl Default for ProcessStreams {
    /// No streams, and a client that never goes (its sender is already dropped).
    fn default() -> ProcessStreams {
        ProcessStreams {
            stdin: None,
            stdout: None,
            stderr: None,
            resize: None,
            gone: tokio::sync::watch::channel(false).1,
        }
    }
}

/// The next item of an optional channel; never ready when there is none.
pub(super) async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The FIFO paths of one exec, removed on drop.
struct ExecFifos(Vec<std::path::PathBuf>);

impl Drop for ExecFifos {
    fn drop(&mut self) {
        for p in &self.0 {
            if let Err(e) = std::fs::remove_file(p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(path = %p.display(), error = %e, "remove an exec FIFO");
                }
            }
        }
    }
}

impl Containers {
    /// Runs `cmd` in container `id` with the client's streams; returns its exit code.
    pub async fn exec_stream(
        &self,
        id: &str,
        cmd: Vec<String>,
        tty: bool,
        io: ProcessStreams,
    ) -> Result<i32, ContainerError> {
        let c = self.runnable(id, &cmd, "Exec")?;
        let mut process = c.process.clone();
        process["args"] = serde_json::json!(cmd);
        process["terminal"] = false.into();
        if tty {
            with_tty(&mut process);
        }
        let exec_id = format!("exec-{}", &new_id()[..16]);
        let fifos = logs::make_fifos(&c.bundle, &exec_id).map_err(io_err("make exec FIFOs"))?;
        let mut paths = ExecFifos(vec![fifos.stdout_path.clone(), fifos.stderr_path.clone()]);
        let stdin = match io.stdin {
            Some(rx) => {
                let p = logs::make_stdin_fifo(&c.bundle, &exec_id)
                    .map_err(io_err("make the exec's stdin FIFO"))?;
                paths.0.push(p.clone());
                let w = logs::open_stdin_writer(&p).map_err(io_err("open the stdin FIFO"))?;
                Some((p, w, rx))
            }
            None => None,
        };
        // Read from the FIFOs before the shim opens them (it waits for a reader); output
        // nobody asked for is read and dropped. With a tty there is no stderr FIFO for the
        // shim, and its read end is simply dropped.
        let out = tokio::spawn(forward(fifos.stdout, io.stdout));
        let err = (!tty).then(|| tokio::spawn(forward(fifos.stderr, io.stderr)));
        let stdio = ExecStdio {
            stdin: stdin.as_ref().map(|s| s.0.as_path()),
            stdout: Some(&paths.0[0]),
            stderr: (!tty).then_some(paths.0[1].as_path()),
            terminal: tty,
        };
        let shim = match Shim::connect(&c.shim_address).await {
            Ok(s) => s,
            Err(e) => {
                out.abort();
                err.inspect(|h| h.abort());
                return Err(e.into());
            }
        };
        let started = async {
            shim.exec_stdio(id, &exec_id, &process, &stdio).await?;
            shim.start_exec(id, &exec_id).await
        }
        .await;
        let ran = match started {
            Ok(_) => {
                let (stdin, resize) = (stdin.map(|(_, w, rx)| (w, rx)), io.resize);
                session(&shim, id, &exec_id, tty, stdin, resize, io.gone).await
            }
            Err(e) => Err(e.into()),
        };
        if ran.is_ok() {
            let drained = tokio::time::timeout(DRAIN, async {
                let _ = out.await;
                if let Some(err) = err {
                    let _ = err.await;
                }
            })
            .await;
            if drained.is_err() {
                warn!(container = %id, %exec_id, "exec output did not reach EOF");
            }
        } else {
            out.abort();
            err.inspect(|h| h.abort());
        }
        if let Err(e) = shim.delete_exec(id, &exec_id).await {
            // An exec that was never registered has nothing to delete.
            debug!(container = %id, %exec_id, error = %e, "delete the exec");
        }
        drop(paths);
        ran
    }
}

/// The running exec: the client's input and resizes in, until the process exits; its
/// exit code. The client's stdin ending closes the process's stdin (EOF); the client
/// going away hangs the process up: SIGHUP then SIGKILL with a tty (a terminal's
/// hang-up), SIGKILL without one (as containerd ends an exec whose request is gone).
async fn session(
    shim: &Shim,
    id: &str,
    exec_id: &str,
    tty: bool,
    stdin: Option<(tokio::net::unix::pipe::Sender, mpsc::Receiver<Bytes>)>,
    mut resize: Option<mpsc::Receiver<(u16, u16)>>,
    mut gone: tokio::sync::watch::Receiver<bool>,
) -> Result<i32, ContainerError> {
    let has_stdin = stdin.is_some();
    // Writes may block on a full pipe: in a task of their own, so the wait goes on.
    let mut pump = stdin.map(|(w, rx)| tokio::spawn(pump_stdin(w, rx)));
    let wait = shim.wait(id, exec_id);
    tokio::pin!(wait);
    let mut kill_at: Option<tokio::time::Instant> = None;
    let (mut hang_up, mut hung_up) = (false, false);
    let code = loop {
        if std::mem::take(&mut hang_up) && !std::mem::replace(&mut hung_up, true) {
            debug!(container = %id, %exec_id, "the tty exec's client is gone: SIGHUP");
            if let Err(e) = shim.signal(id, exec_id, libc::SIGHUP as u32, false).await {
                warn!(container = %id, %exec_id, error = %e, "SIGHUP a hung-up exec");
            }
            kill_at = Some(tokio::time::Instant::now() + HANGUP_GRACE);
        }
        tokio::select! {
            code = &mut wait => break code?,
            _ = async { pump.as_mut().expect("guarded").await }, if pump.is_some() => {
                // The writer is closed with the task: the process reads EOF.
                pump = None;
            }
            _ = crate::streaming::backend::client_gone(&mut gone), if !hung_up && kill_at.is_none() => {
                if tty {
                    hang_up = true;
                } else {
                    debug!(container = %id, %exec_id, "the exec's client is gone: SIGKILL");
                    if let Err(e) = shim.signal(id, exec_id, libc::SIGKILL as u32, false).await {
                        warn!(container = %id, %exec_id, error = %e, "SIGKILL an abandoned exec");
                    }
                    hung_up = true;
                }
            }
            size = recv_opt(&mut resize) => match size {
                Some((w, h)) => {
                    if let Err(e) = shim.resize_pty(id, exec_id, w.into(), h.into()).await {
                        warn!(container = %id, %exec_id, error = %e, "ResizePty");
                    }
                }
                None => {
                    resize = None;
                    hang_up = tty && !has_stdin;
                }
            },
            _ = async { tokio::time::sleep_until(kill_at.expect("guarded")).await },
                if kill_at.is_some() => {
                warn!(container = %id, %exec_id, "a hung-up exec outlived SIGHUP: SIGKILL");
                kill_at = None;
                if let Err(e) = shim.signal(id, exec_id, libc::SIGKILL as u32, false).await {
                    warn!(container = %id, %exec_id, error = %e, "SIGKILL a hung-up exec");
                }
            }
        }
    };
    if let Some(p) = pump {
        p.abort();
    }
    Ok(code as i32)
}

/// Copies the client's input into the stdin FIFO until the client's stdin ends; the
/// FIFO's write end closes when this returns.
async fn pump_stdin(mut w: tokio::net::unix::pipe::Sender, mut rx: mpsc::Receiver<Bytes>) {
    while let Some(b) = rx.recv().await {
        if let Err(e) = w.write_all(&b).await {
            warn!(error = %e, "write an exec's stdin");
            return;
        }
    }
}

/// Copies a FIFO to a channel until EOF (or, with no channel, drains it).
async fn forward(mut src: tokio::net::unix::pipe::Receiver, mut tx: Option<mpsc::Sender<Bytes>>) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match src.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Some(t) = &tx {
                    if t.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                        // Client gone: keep draining so the process never blocks on us.
                        tx = None;
                    }
                }
            }
        }
    }
}
