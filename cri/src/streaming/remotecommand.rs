//! Exec and attach over SPDY (kubelet's `remotecommand` server side): protocol versions,
//! which streams to wait for, pumping them to the backend, the exit status at the end.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::backend::{AttachRequest, BackendError, ExecIo, ExecRequest, StreamBackend, TermSize};
use super::spdy::{Session, Stream, StreamReader, StreamWriter};
use super::status;

/// The remotecommand sub-protocols, newest first as the server prefers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    /// `channel.k8s.io`: no resize, errors as text.
    V1,
    /// `v2.channel.k8s.io`: no stderr stream with a tty.
    V2,
    /// `v3.channel.k8s.io`: adds the resize stream.
    V3,
    /// `v4.channel.k8s.io`: errors as `metav1.Status` JSON (exit codes).
    V4,
    /// `v5.channel.k8s.io`: as v4; on WebSocket adds the close channel.
    V5,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::V1 => "channel.k8s.io",
            Protocol::V2 => "v2.channel.k8s.io",
            Protocol::V3 => "v3.channel.k8s.io",
            Protocol::V4 => "v4.channel.k8s.io",
            Protocol::V5 => "v5.channel.k8s.io",
        }
    }

    /// What kubelet offers over SPDY: v5 is WebSocket-only there (its close channel has no
    /// SPDY meaning), but a client asking for it over SPDY gets v4's behaviour under v5's name.
    pub const SPDY: [Protocol; 5] = [
        Protocol::V5,
        Protocol::V4,
        Protocol::V3,
        Protocol::V2,
        Protocol::V1,
    ];

    pub fn from_name(s: &str) -> Option<Protocol> {
        Protocol::SPDY.into_iter().find(|p| p.name() == s.trim())
    }

    fn status_json(self) -> bool {
        self >= Protocol::V4
    }

    fn has_resize(self) -> bool {
        self >= Protocol::V3
    }
}

/// Picks the server's most preferred protocol among the client's `X-Stream-Protocol-Version`
/// values (each header may hold a comma-separated list); `None` when there is none in
/// common (the server answers 403 then, or, for a client that offered nothing at all,
/// falls back to `channel.k8s.io` as kubelet does for pre-negotiation clients).
pub fn negotiate<'a>(offered: impl IntoIterator<Item = &'a str>) -> Option<Protocol> {
    offered
        .into_iter()
        .flat_map(|v| v.split(','))
        .filter_map(Protocol::from_name)
        .max()
}

/// Exec or attach: what the token stood for.
#[derive(Debug, Clone)]
pub enum Command {
    Exec(ExecRequest),
    Attach(AttachRequest),
}

impl Command {
    pub fn flags(&self) -> (bool, bool, bool, bool) {
        match self {
            Command::Exec(r) => (r.stdin, r.stdout, r.stderr, r.tty),
            Command::Attach(r) => (r.stdin, r.stdout, r.stderr, r.tty),
        }
    }

    pub async fn run(&self, backend: &dyn StreamBackend, io: ExecIo) -> Result<i32, BackendError> {
        match self {
            Command::Exec(r) => backend.exec(r.clone(), io).await,
            Command::Attach(r) => backend.attach(r.clone(), io).await,
        }
    }
}

/// Streams the client must open before the command runs (kubelet waits for the same set).
fn expected(cmd: &Command, proto: Protocol) -> Vec<&'static str> {
    let (stdin, stdout, stderr, tty) = cmd.flags();
    let mut v = vec!["error"];
    if stdin {
        v.push("stdin");
    }
    if stdout {
        v.push("stdout");
    }
    // Before v2 the client opened stderr even with a tty.
    if stderr && (!tty || proto == Protocol::V1) {
        v.push("stderr");
    }
    if tty && proto.has_resize() {
        v.push("resize");
    }
    v
}

#[derive(Default)]
struct Streams {
    error: Option<Stream>,
    stdin: Option<Stream>,
    stdout: Option<Stream>,
    stderr: Option<Stream>,
    resize: Option<Stream>,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteCommandError {
    #[error("timed out waiting for the client's streams ({0} of {1})")]
    StreamTimeout(usize, usize),
    #[error("connection closed before the client opened its streams")]
    Closed,
}

/// Serves one exec/attach on an upgraded SPDY session, then closes it.
pub async fn serve_spdy(
    mut session: Session,
    proto: Protocol,
    cmd: Command,
    backend: Arc<dyn StreamBackend>,
    stream_timeout: Duration,
) -> Result<(), RemoteCommandError> {
    let want = expected(&cmd, proto);
    let mut got = Streams::default();
    let mut n = 0;
    let deadline = tokio::time::Instant::now() + stream_timeout;
    while n < want.len() {
        let st = match tokio::time::timeout_at(deadline, session.accept()).await {
            Err(_) => {
                session.close().await;
                return Err(RemoteCommandError::StreamTimeout(n, want.len()));
            }
            Ok(None) => return Err(RemoteCommandError::Closed),
            Ok(Some(st)) => st,
        };
        let kind = st.headers.get("streamtype").unwrap_or("").to_string();
        let slot = match kind.as_str() {
            "error" => &mut got.error,
            "stdin" => &mut got.stdin,
            "stdout" => &mut got.stdout,
            "stderr" => &mut got.stderr,
            "resize" => &mut got.resize,
            other => {
                warn!(
                    stream_type = other,
                    "exec: refusing a stream of unknown type"
                );
                let _ = st
                    .writer
                    .reset(super::spdy::frame::rst::PROTOCOL_ERROR)
                    .await;
                continue;
            }
        };
        if slot.is_some() {
            warn!(stream_type = %kind, "exec: duplicate stream");
            let _ = st
                .writer
                .reset(super::spdy::frame::rst::PROTOCOL_ERROR)
                .await;
            continue;
        }
        if !want.contains(&kind.as_str()) {
            // A stream the request did not ask for (stdin for an exec without stdin, say):
            // refused, so the backend never sees more than the request allowed.
            warn!(stream_type = %kind, "exec: refusing a stream the request did not ask for");
            let _ = st
                .writer
                .reset(super::spdy::frame::rst::REFUSED_STREAM)
                .await;
            continue;
        }
        n += 1;
        *slot = Some(st);
    }
    debug!(protocol = proto.name(), "exec: all streams open");

    let (gone_tx, gone_rx) = tokio::sync::watch::channel(false);
    let (io, pumps) = wire(&mut got, gone_rx);
    // While the command runs, the session is watched: its end (the client's connection
    // gone) is what the backend hangs up on; late streams are refused.
    let run = cmd.run(backend.as_ref(), io);
    tokio::pin!(run);
    let mut watching = true;
    let result = loop {
        tokio::select! {
            r = &mut run => break r,
            st = session.accept(), if watching => match st {
                None => {
                    watching = false;
                    let _ = gone_tx.send(true);
                }
                Some(st) => {
                    let _ = st
                        .writer
                        .reset(super::spdy::frame::rst::REFUSED_STREAM)
                        .await;
                }
            },
        }
    };
    // The backend has dropped its senders: the pumps drain and FIN stdout/stderr before
    // the status goes out, so the client has all output when it learns the exit code.
    for p in pumps {
        let _ = p.await;
    }
    if let Some(err) = got.error.take() {
        let msg = match (&result, proto.status_json()) {
            (Ok(code), true) => Some(status::exit_status_json(*code)),
            (Ok(code), false) => status::exit_status_text(*code),
            (Err(e), true) => Some(status::error_status_json(&e.to_string())),
            (Err(e), false) => Some(e.to_string()),
        };
        if let Some(msg) = msg {
            let _ = err.writer.write_all(msg.as_bytes()).await;
        }
        let _ = err.writer.finish().await;
    }
    if let Err(e) = &result {
        warn!(error = %e, "exec: backend failed");
    }
    session.close().await;
    Ok(())
}

/// Connects the SPDY streams to the backend's channels; returns the output pumps to await.
fn wire(
    got: &mut Streams,
    gone: tokio::sync::watch::Receiver<bool>,
) -> (ExecIo, Vec<tokio::task::JoinHandle<()>>) {
    let mut pumps = Vec::new();
    let stdin = got.stdin.take().map(|st| {
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(pump_in(st.reader, tx));
        rx
    });
    let mut out = |st: Option<Stream>| {
        st.map(|st| {
            let (tx, rx) = mpsc::channel(8);
            pumps.push(tokio::spawn(pump_out(rx, st.writer)));
            tx
        })
    };
    let stdout = out(got.stdout.take());
    let stderr = out(got.stderr.take());
    let resize = got.resize.take().map(|st| {
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(pump_resize(st.reader, tx));
        rx
    });
    (
        ExecIo {
            stdin,
            stdout,
            stderr,
            resize,
            gone,
        },
        pumps,
    )
}

async fn pump_in(mut r: StreamReader, tx: mpsc::Sender<Bytes>) {
    while let Some(b) = r.recv().await {
        if tx.send(b).await.is_err() {
            break;
        }
    }
}

async fn pump_out(mut rx: mpsc::Receiver<Bytes>, w: StreamWriter) {
    while let Some(b) = rx.recv().await {
        if w.write_all(&b).await.is_err() {
            // Client gone: keep draining so the backend never blocks on us.
            while rx.recv().await.is_some() {}
            return;
        }
    }
    let _ = w.finish().await;
}

async fn pump_resize(mut r: StreamReader, tx: mpsc::Sender<TermSize>) {
    let mut dec = ResizeDecoder::default();
    while let Some(b) = r.recv().await {
        for size in dec.push(&b) {
            if tx.send(size).await.is_err() {
                return;
            }
        }
    }
}

/// The resize stream is a sequence of JSON objects (Go's `json.Encoder`), split across
/// frames however the client likes. Bounded: a client that sends a never-ending object
/// loses its resize stream, not our memory.
#[derive(Default)]
pub struct ResizeDecoder {
    buf: Vec<u8>,
}

impl ResizeDecoder {
    const MAX: usize = 4096;

    pub fn push(&mut self, data: &[u8]) -> Vec<TermSize> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<TermSize>();
        let mut used = 0;
        loop {
            match it.next() {
                Some(Ok(s)) => {
                    out.push(s);
                    used = it.byte_offset();
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(_)) => {
                    // Not a size: skip it all (kubelet logs and goes on too).
                    used = self.buf.len();
                    break;
                }
                None => {
                    used = self.buf.len();
                    break;
                }
            }
        }
        self.buf.drain(..used);
        if self.buf.len() > Self::MAX {
            self.buf.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_prefers_the_newest_common() {
        assert_eq!(
            negotiate(["v4.channel.k8s.io", "v3.channel.k8s.io"]),
            Some(Protocol::V4)
        );
        assert_eq!(
            negotiate(["channel.k8s.io, v2.channel.k8s.io"]),
            Some(Protocol::V2)
        );
        assert_eq!(negotiate(["v9.channel.k8s.io"]), None);
        assert_eq!(negotiate([]), None);
    }

    #[test]
    fn expected_streams() {
        let exec = |stdin, tty| {
            Command::Exec(ExecRequest {
                container_id: "c".into(),
                cmd: vec!["sh".into()],
                tty,
                stdin,
                stdout: true,
                stderr: !tty,
            })
        };
        assert_eq!(
            expected(&exec(true, false), Protocol::V4),
            ["error", "stdin", "stdout", "stderr"]
        );
        assert_eq!(
            expected(&exec(true, true), Protocol::V4),
            ["error", "stdin", "stdout", "resize"]
        );
        assert_eq!(
            expected(&exec(false, true), Protocol::V2),
            ["error", "stdout"]
        );
    }

    #[test]
    fn resize_decoder_handles_splits_and_garbage() {
        let mut d = ResizeDecoder::default();
        assert_eq!(d.push(b"{\"Width\":80,"), vec![]);
        assert_eq!(
            d.push(b"\"Height\":24}\n{\"Width\":100,\"Height\":30}\n"),
            vec![
                TermSize {
                    width: 80,
                    height: 24
                },
                TermSize {
                    width: 100,
                    height: 30
                }
            ]
        );
        assert_eq!(d.push(b"nonsense"), vec![]);
        assert_eq!(
            d.push(b"{\"Width\":1,\"Height\":2}"),
            vec![TermSize {
                width: 1,
                height: 2
            }]
        );
        d.push(&[b'{'; 10_000]);
        assert!(d.buf.len() <= ResizeDecoder::MAX);
    }
}
