//! Buffers for a process's output and the writer for its input.
//!
//! A pump task reads each output pipe (or pty) into an [`OutputBuffer`]; `ReadStdout` /
//! `ReadStderr` take from it, blocking until there is data or EOF. The buffer is bounded:
//! when nobody reads, the pump stops reading and the process blocks on a full pipe, as it
//! would with any other runtime.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Bytes buffered per stream before the pump waits for a reader.
const MAX_BUFFERED: usize = 1 << 20;

#[derive(Default)]
struct State {
    data: VecDeque<u8>,
    eof: bool,
}

/// The buffered output of one stream of one process.
#[derive(Default)]
pub struct OutputBuffer {
    state: Mutex<State>,
    /// Signalled when data arrives or EOF is reached.
    readable: Notify,
    /// Signalled when a reader drained data.
    writable: Notify,
}

impl OutputBuffer {
    /// A buffer that is already at EOF (e.g. stderr of a terminal process).
    pub fn closed() -> Arc<Self> {
        let b = OutputBuffer::default();
        b.state.lock().expect("stdio lock").eof = true;
        Arc::new(b)
    }

    /// Starts pumping `fd` (a pipe read end or pty master) into a new buffer.
    pub fn pump(fd: OwnedFd) -> std::io::Result<Arc<Self>> {
        let buf = Arc::new(OutputBuffer::default());
        let reader = crate::fdio::AsyncFdReader::new(fd)?;
        let b = buf.clone();
        tokio::spawn(async move { b.run(reader).await });
        Ok(buf)
    }

    async fn run(self: Arc<Self>, mut reader: crate::fdio::AsyncFdReader) {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            // Back-pressure: wait until a reader made room.
            loop {
                let notified = self.writable.notified();
                if self.state.lock().expect("stdio lock").data.len() < MAX_BUFFERED {
                    break;
                }
                notified.await;
            }
            match reader.read(&mut chunk).await {
                // EIO is how a pty master reports that the last slave fd closed.
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    self.state
                        .lock()
                        .expect("stdio lock")
                        .data
                        .extend(&chunk[..n]);
                    self.readable.notify_waiters();
                }
            }
        }
        self.state.lock().expect("stdio lock").eof = true;
        self.readable.notify_waiters();
    }

    /// Waits for data or EOF; returns up to `max` bytes and whether the stream is finished.
    pub async fn read(&self, max: usize) -> (Vec<u8>, bool) {
        loop {
            let notified = self.readable.notified();
            {
                let mut st = self.state.lock().expect("stdio lock");
                if !st.data.is_empty() || st.eof {
                    let n = st.data.len().min(max);
                    let out: Vec<u8> = st.data.drain(..n).collect();
                    let eof = st.eof && st.data.is_empty();
                    drop(st);
                    self.writable.notify_waiters();
                    return (out, eof);
                }
            }
            notified.await;
        }
    }
}
