//! Attach to a running container, as containerd's CRI plugin does it: the container's
//! output reaches the client through the log writer's fan-out (the CRI log keeps getting
//! it too), the client's input goes into the container's stdin FIFO (made at Create for a
//! container with `stdin`; huskd keeps its write end open for the container's lifetime),
//! and resizes go to the shim's ResizePty of the init process.
//!
//! When the client's stdin ends (EOF or the client went away): with `stdin_once` the
//! container's stdin is closed (its process reads EOF) and no later attach gets a stdin;
//! the attach then goes on streaming output until the container exits. Without
//! `stdin_once` the client is detached and the container's stdin stays open for the next.
//! An attach without stdin lasts until the container exits. The container's exit code ends
//! the attach.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::exec_stream::{recv_opt, ProcessStreams};
use super::{ContainerError, ContainerState, Containers};
use crate::shim_client::Shim;

/// After the exit, how long the container's output may take to reach attached clients.
const DRAIN: Duration = Duration::from_secs(10);

/// A container's stdin: the FIFO's write end while it is open, else why it is not.
pub struct ContainerStdin {
    writer: tokio::sync::Mutex<Option<pipe::Sender>>,
    once: bool,
    closed: std::sync::Mutex<Option<String>>,
}

impl ContainerStdin {
    pub fn new(writer: pipe::Sender, once: bool) -> ContainerStdin {
        ContainerStdin {
            writer: tokio::sync::Mutex::new(Some(writer)),
            once,
            closed: Default::default(),
        }
    }

    /// A stdin that is already closed, for `reason`.
    pub fn closed(reason: &str) -> ContainerStdin {
        ContainerStdin {
            writer: tokio::sync::Mutex::new(None),
            once: false,
            closed: std::sync::Mutex::new(Some(reason.into())),
        }
    }

    /// Why the stdin is closed, if it is.
    pub fn closed_reason(&self) -> Option<String> {
        self.closed.lock().expect("stdin lock").clone()
    }

    /// Writes a client's input. Writers of concurrent clients take turns chunk by chunk.
    async fn write(&self, data: &[u8]) -> std::io::Result<()> {
        let mut w = self.writer.lock().await;
        match w.as_mut() {
            Some(w) => w.write_all(data).await,
            None => Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "stdin is closed",
            )),
        }
    }

    /// Closes the FIFO's write end: the shim reads EOF after every byte written before and
    /// closes the process's stdin.
    async fn close(&self, reason: &str) {
        self.closed
            .lock()
            .expect("stdin lock")
            .get_or_insert_with(|| reason.into());
        drop(self.writer.lock().await.take());
    }

    /// Copies a client's input in until it ends; then, with `stdin_once`, closes the
    /// container's stdin. Returns whether it did.
    pub async fn pump(&self, mut rx: mpsc::Receiver<Bytes>) -> bool {
        while let Some(b) = rx.recv().await {
            if let Err(e) = self.write(&b).await {
                warn!(error = %e, "attach: write the container's stdin");
                break;
            }
        }
        if self.once {
            self.close("stdin_once: the first attached client detached")
                .await;
        }
        self.once
    }
}

impl Containers {
    /// Why container `id`'s stdin is closed (None: it is open, or it has none).
    pub fn stdin_closed(&self, id: &str) -> Option<String> {
        let t = self.table.lock().expect("containers lock");
        t.get(id)?.stdin.as_ref()?.closed_reason()
    }

    /// Attaches `io` to running container `id`; returns its exit code, or 0 when the client
    /// detached first.
    pub async fn attach(&self, id: &str, io: ProcessStreams) -> Result<i32, ContainerError> {
        let (c, output, stdin, mut exited) = {
            let t = self.table.lock().expect("containers lock");
            let s = t
                .get(id)
                .ok_or_else(|| ContainerError::NotFound(id.into()))?;
            (
                s.c.clone(),
                s.output.clone(),
                s.stdin.clone(),
                s.exited.subscribe(),
            )
        };
        if c.state != ContainerState::Running {
            return Err(ContainerError::State {
                id: id.into(),
                state: c.state,
                call: "Attach",
                want: "running",
            });
        }
        // Before anything is spawned or subscribed: a failure here leaves nothing behind.
        let shim = if io.resize.is_some() {
            Some(Shim::connect(&c.shim_address).await?)
        } else {
            None
        };
        let stdin = match (io.stdin, stdin) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(ContainerError::InvalidConfig(format!(
                    "Attach: container {id} was not created with stdin"
                )))
            }
            (Some(rx), Some(s)) => {
                if let Some(why) = s.closed_reason() {
                    return Err(ContainerError::StdinClosed { id: id.into(), why });
                }
                let s2 = s.clone();
                Some(tokio::spawn(async move { s2.pump(rx).await }))
            }
        };
        let sub = output.subscribe(io.stdout, io.stderr);
        info!(container = %id, subscriber = sub, "attached");
        let (mut stdin, mut resize, mut gone) = (stdin, io.resize, io.gone);
        let ended = loop {
            tokio::select! {
                // (The watch's guard is dropped in here: it must not live across an await.)
                _ = async { exited.wait_for(|e| *e).await.is_ok() } => break None,
                // The client went away: detach (the container and its stdin stay).
                _ = crate::streaming::backend::client_gone(&mut gone) => break Some(0),
                r = async { stdin.as_mut().expect("guarded").await }, if stdin.is_some() => {
                    stdin = None;
                    if !matches!(r, Ok(true)) {
                        // Detached: the container's stdin stays for the next client.
                        break Some(0);
                    }
                    // stdin_once closed it: the output goes on until the container exits.
                }
                size = recv_opt(&mut resize) => match size {
                    Some((w, h)) => {
                        let shim = shim.as_ref().expect("a shim with a resize stream");
                        if let Err(e) = shim.resize_pty(id, "", w.into(), h.into()).await {
                            warn!(container = %id, error = %e, "attach: ResizePty");
                        }
                    }
                    None => resize = None,
                },
            }
        };
        if let Some(h) = stdin {
            h.abort();
        }
        let code = match ended {
            Some(code) => code,
            None => {
                // The shim drained the output into the FIFOs before it reported the exit;
                // let the log writer pass the rest on before the client gets the status.
                if tokio::time::timeout(DRAIN, output.wait_ended())
                    .await
                    .is_err()
                {
                    warn!(container = %id, "attach: the output did not reach EOF after the exit");
                }
                self.get(id).map_or(0, |c| c.exit_code)
            }
        };
        output.unsubscribe(sub);
        info!(container = %id, subscriber = sub, code, "detached");
        Ok(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn fifo(dir: &std::path::Path) -> std::path::PathBuf {
        crate::logs::make_stdin_fifo(dir, "c").unwrap()
    }

    /// stdin_once: the first client's EOF closes the container's stdin (its reader sees
    /// EOF after everything written), and later clients are told why.
    #[tokio::test]
    async fn stdin_once_closes_the_stdin_when_the_first_client_detaches() {
        let dir = tempfile::tempdir().unwrap();
        let p = fifo(dir.path());
        let s = ContainerStdin::new(crate::logs::open_stdin_writer(&p).unwrap(), true);
        let mut reader = pipe::OpenOptions::new().open_receiver(&p).unwrap();
        let (tx, rx) = mpsc::channel(4);
        tx.send(Bytes::from_static(b"hello\n")).await.unwrap();
        drop(tx); // the client detaches
        assert!(s.pump(rx).await, "stdin_once closed it");
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut got))
            .await
            .expect("EOF on the container's stdin")
            .unwrap();
        assert_eq!(got, b"hello\n");
        assert!(s.closed_reason().unwrap().contains("stdin_once"));
        let (tx, rx) = mpsc::channel(4);
        tx.send(Bytes::from_static(b"late")).await.unwrap();
        drop(tx);
        s.pump(rx).await;
    }

    /// Without stdin_once the stdin stays open across clients: the second one's input
    /// follows the first's, and no EOF comes.
    #[tokio::test]
    async fn without_stdin_once_the_stdin_outlives_its_clients() {
        let dir = tempfile::tempdir().unwrap();
        let p = fifo(dir.path());
        let s = ContainerStdin::new(crate::logs::open_stdin_writer(&p).unwrap(), false);
        let mut reader = pipe::OpenOptions::new().open_receiver(&p).unwrap();
        for text in [&b"one\n"[..], &b"two\n"[..]] {
            let (tx, rx) = mpsc::channel(4);
            tx.send(Bytes::copy_from_slice(text)).await.unwrap();
            drop(tx);
            assert!(!s.pump(rx).await);
        }
        let mut buf = [0u8; 8];
        reader.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"one\ntwo\n");
        assert!(s.closed_reason().is_none());
        let mut more = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(200), reader.read(&mut more))
                .await
                .is_err(),
            "no EOF: the stdin is still open"
        );
    }
}
