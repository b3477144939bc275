//! A process's stdio between containerd's FIFOs and the sandbox: pumps from an async reader
//! (the process's output, from the agent) into containerd's stdout/stderr FIFOs, and from
//! containerd's stdin FIFO into an async writer (the process's stdin).
//!
//! FIFOs are opened `O_NONBLOCK` and driven by tokio's `unix::pipe` types (epoll), never
//! through `tokio::fs`, whose blocking-pool reads of a FIFO hang (containerd/rust-extensions
//! #337). Two rules containerd depends on:
//! - an output pump closes its FIFO writer as soon as the output reaches EOF: containerd
//!   1.6's ExecSync waits for EOF on both FIFOs with no timeout;
//! - the stdin pump forwards EOF (shuts its writer down) when containerd closes stdin.
//!
//! An output pump also holds a read end of its FIFO, so a client that restarts finds the
//! output waiting instead of a pump ended by EPIPE.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;

/// How long an output FIFO may have no reader when we open it. containerd opens its read
/// ends before Create/Exec, so this only matters for a client that died meanwhile.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// The stdio paths containerd gave a process (empty: none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioPaths {
    fn path(s: &str) -> Option<PathBuf> {
        // containerd passes plain paths for FIFOs; binary:// and file:// log URIs are for
        // runc-style shims and are not supported here.
        (!s.is_empty()).then(|| PathBuf::from(s.strip_prefix("fifo://").unwrap_or(s)))
    }
}

/// Opens an output FIFO for writing without blocking; waits (asynchronously) for a reader
/// up to [`OPEN_TIMEOUT`] — a non-blocking open fails with ENXIO until there is one.
pub async fn open_output(path: &Path) -> io::Result<pipe::Sender> {
    let deadline = Instant::now() + OPEN_TIMEOUT;
    loop {
        match pipe::OpenOptions::new().open_sender(path) {
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r => return r,
        }
    }
}

/// Opens the stdin FIFO for reading without blocking. No read is tried before epoll reports
/// data or a hang-up, and Linux reports no hang-up on a FIFO read end until a writer has come
/// and gone, so a reader opened before containerd's writer does not see a false EOF.
pub fn open_input(path: &Path) -> io::Result<pipe::Receiver> {
    pipe::OpenOptions::new().open_receiver(path)
}

/// Copies `src` into the FIFO until `src` ends, then closes the FIFO (containerd reads
/// EOF). Returns the bytes copied.
pub async fn pump_out<R: AsyncRead + Unpin>(mut src: R, mut fifo: pipe::Sender) -> io::Result<u64> {
    let n = tokio::io::copy(&mut src, &mut fifo).await?;
    fifo.flush().await?;
    drop(fifo);
    Ok(n)
}

/// Copies the stdin FIFO into `dst` until containerd closes its end, then shuts `dst` down
/// so the process reads EOF. Returns the bytes copied.
pub async fn pump_in<W: AsyncWrite + Unpin>(
    mut fifo: pipe::Receiver,
    mut dst: W,
) -> io::Result<u64> {
    let mut buf = vec![0u8; 32 * 1024];
    let mut total = 0u64;
    loop {
        let n = fifo.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n]).await?;
        dst.flush().await?;
        total += n as u64;
    }
    dst.shutdown().await?;
    Ok(total)
}

/// A process's streams on the sandbox side.
pub struct ProcessIo {
    pub stdin: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    pub stdout: Option<Box<dyn AsyncRead + Send + Unpin>>,
    pub stderr: Option<Box<dyn AsyncRead + Send + Unpin>>,
}

/// The running pumps of one process.
pub struct Pumps {
    stdin: Option<JoinHandle<io::Result<u64>>>,
    outputs: Vec<JoinHandle<io::Result<u64>>>,
}

impl Pumps {
    /// Opens containerd's FIFOs named in `paths` and starts pumping between them and `io`.
    /// A stream present on one side only is dropped (its peer reads EOF).
    pub async fn start(paths: &StdioPaths, io: ProcessIo) -> io::Result<Pumps> {
        let mut outputs = Vec::new();
        for (p, src) in [(&paths.stdout, io.stdout), (&paths.stderr, io.stderr)] {
            if let (Some(p), Some(src)) = (StdioPaths::path(p), src) {
                let fifo = open_output(&p)
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", p.display())))?;
                // A read end of our own, never read, as containerd's runc shim keeps one:
                // when the client dies (huskd or containerd killed and restarted) our writes
                // do not fail with EPIPE and end the pump; they wait in the pipe (and then
                // block) until the restarted client opens the FIFO again and reads on.
                let keep = open_input(&p)
                    .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", p.display())))?;
                outputs.push(tokio::spawn(async move {
                    let _keep = keep;
                    pump_out(src, fifo).await
                }));
            }
        }
        let stdin = match (StdioPaths::path(&paths.stdin), io.stdin) {
            (Some(p), Some(dst)) => {
                let fifo = open_input(&p)
                    .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", p.display())))?;
                Some(tokio::spawn(pump_in(fifo, dst)))
            }
            _ => None,
        };
        Ok(Pumps { stdin, outputs })
    }

    /// Waits until every output reached EOF and its FIFO is closed.
    pub async fn drained(&mut self) {
        for h in self.outputs.drain(..) {
            match h.await {
                Ok(Err(e)) => tracing::warn!("output pump: {e}"),
                Err(e) => tracing::warn!("output pump task: {e}"),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// CloseIO: stop reading stdin. The process's stdin is closed by dropping the writer.
    pub fn close_stdin(&mut self) {
        if let Some(h) = self.stdin.take() {
            h.abort();
        }
    }
}

impl Drop for Pumps {
    fn drop(&mut self) {
        for h in self.outputs.drain(..).chain(self.stdin.take()) {
            h.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkfifo(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        p
    }

    /// Output reaches the FIFO's reader and the reader sees EOF once the source ends —
    /// the EOF containerd's ExecSync waits for.
    #[tokio::test]
    async fn output_pump_delivers_then_closes_the_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let p = mkfifo(dir.path(), "stdout");
        // containerd's side: a reader opened first.
        let mut reader = pipe::OpenOptions::new().open_receiver(&p).unwrap();
        let (mut w, r) = tokio::io::duplex(64);
        let fifo = open_output(&p).await.unwrap();
        let pump = tokio::spawn(pump_out(r, fifo));
        w.write_all(b"hello\n").await.unwrap();
        let mut buf = [0u8; 6];
        reader.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello\n");
        drop(w); // the process's output ends
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut rest))
            .await
            .expect("EOF on the FIFO after the source ended")
            .unwrap();
        assert!(rest.is_empty());
        assert_eq!(pump.await.unwrap().unwrap(), 6);
    }

    /// Opening an output FIFO waits for its reader instead of failing with ENXIO.
    #[tokio::test]
    async fn output_open_waits_for_a_reader() {
        let dir = tempfile::tempdir().unwrap();
        let p = mkfifo(dir.path(), "stdout");
        let p2 = p.clone();
        let opener = tokio::spawn(async move { open_output(&p2).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!opener.is_finished(), "opened with no reader");
        let _reader = pipe::OpenOptions::new().open_receiver(&p).unwrap();
        tokio::time::timeout(Duration::from_secs(2), opener)
            .await
            .expect("open after the reader came")
            .unwrap()
            .unwrap();
    }

    /// stdin opened before containerd's writer sees no false EOF; data then EOF are
    /// forwarded, and the destination is shut down (the process reads EOF).
    #[tokio::test]
    async fn input_pump_waits_for_writer_and_forwards_eof() {
        let dir = tempfile::tempdir().unwrap();
        let p = mkfifo(dir.path(), "stdin");
        let fifo = open_input(&p).unwrap();
        let (w, mut r) = tokio::io::duplex(64);
        let pump = tokio::spawn(pump_in(fifo, w));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!pump.is_finished(), "EOF before any writer came");
        let mut writer = pipe::OpenOptions::new().open_sender(&p).unwrap();
        writer.write_all(b"abc").await.unwrap();
        drop(writer); // containerd closes stdin
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), r.read_to_end(&mut got))
            .await
            .expect("EOF forwarded to the process")
            .unwrap();
        assert_eq!(got, b"abc");
        assert_eq!(pump.await.unwrap().unwrap(), 3);
    }

    /// A client that dies and comes back (huskd restarted) loses nothing: the pump holds a
    /// read end, so writes in between wait in the pipe for the new reader.
    #[tokio::test]
    async fn output_survives_its_reader_going_and_coming_back() {
        let dir = tempfile::tempdir().unwrap();
        let out = mkfifo(dir.path(), "out");
        let mut first = pipe::OpenOptions::new().open_receiver(&out).unwrap();
        let (mut w, r) = tokio::io::duplex(64);
        let paths = StdioPaths {
            stdout: out.to_string_lossy().into(),
            ..Default::default()
        };
        let io = ProcessIo {
            stdin: None,
            stdout: Some(Box::new(r)),
            stderr: None,
        };
        let mut pumps = Pumps::start(&paths, io).await.unwrap();
        w.write_all(b"one\n").await.unwrap();
        let mut buf = [0u8; 4];
        first.read_exact(&mut buf).await.unwrap();
        drop(first); // the client dies
        w.write_all(b"two\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut second = pipe::OpenOptions::new().open_receiver(&out).unwrap();
        drop(w);
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut rest))
            .await
            .expect("EOF once the output ended")
            .unwrap();
        assert_eq!(rest, b"two\n");
        pumps.drained().await;
    }

    /// The whole set: stdout and stderr to their FIFOs, EOF on both after the process
    /// ends, `drained` returns.
    #[tokio::test]
    async fn pumps_drain_both_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let out = mkfifo(dir.path(), "out");
        let err = mkfifo(dir.path(), "err");
        let mut ro = pipe::OpenOptions::new().open_receiver(&out).unwrap();
        let mut re = pipe::OpenOptions::new().open_receiver(&err).unwrap();
        let paths = StdioPaths {
            stdin: String::new(),
            stdout: out.to_string_lossy().into(),
            stderr: err.to_string_lossy().into(),
            terminal: false,
        };
        let io = ProcessIo {
            stdin: None,
            stdout: Some(Box::new(&b"o1\n"[..])),
            stderr: Some(Box::new(&b"e1\n"[..])),
        };
        let mut pumps = Pumps::start(&paths, io).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), pumps.drained())
            .await
            .expect("drained");
        let (mut a, mut b) = (String::new(), String::new());
        ro.read_to_string(&mut a).await.unwrap();
        re.read_to_string(&mut b).await.unwrap();
        assert_eq!((a.as_str(), b.as_str()), ("o1\n", "e1\n"));
    }
}
