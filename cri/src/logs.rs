//! Container stdio and the CRI log file. huskd makes each process's stdout/stderr FIFOs and
//! opens their read ends before the shim's Create (the shim opens the write ends at Start
//! and closes them once the process's output is drained). For a container, a writer task
//! turns what arrives into the kubelet's log format, one record per line:
//! `<RFC3339Nano time> <stdout|stderr> <F|P> <text>\n`, a line longer than [`MAX_LINE`]
//! split into `P` (partial) records that end with an `F`. Output with no newline at EOF is
//! written as a last `F` record, as containerd does.
//!
//! The log file sits behind a lock shared with the container's record, so ReopenContainerLog
//! can swap in a new file between two writes. After a huskd restart the FIFOs, still held
//! open by the shim, are opened again ([`open_fifos`]) and a new writer appends to the log.
//!
//! FIFOs are read through tokio's `unix::pipe` (epoll), never `tokio::fs`, whose blocking
//! reads of a FIFO hang (containerd/rust-extensions #337).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::fanout::Fanout;

/// The longest line written as one record (containerd's `max_container_log_line_size`).
pub const MAX_LINE: usize = 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// One log record's text (without its newline) and whether it is a partial line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub text: Vec<u8>,
    pub partial: bool,
}

/// Cuts a byte stream into records: complete lines, and `P` records of `max` bytes for
/// lines longer than that.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    pub fn new(max: usize) -> LineSplitter {
        LineSplitter {
            buf: Vec::new(),
            max: max.max(1),
        }
    }

    /// Adds `data`; returns the records it completes.
    pub fn push(&mut self, data: &[u8]) -> Vec<Record> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        loop {
            let nl = self.buf.iter().position(|&b| b == b'\n');
            match nl {
                Some(i) if i <= self.max => {
                    let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                    line.pop();
                    out.push(Record {
                        text: line,
                        partial: false,
                    });
                }
                _ if self.buf.len() > self.max => {
                    out.push(Record {
                        text: self.buf.drain(..self.max).collect(),
                        partial: true,
                    });
                }
                _ => break,
            }
        }
        out
    }

    /// At EOF: what is left, as a full record.
    pub fn finish(&mut self) -> Option<Record> {
        (!self.buf.is_empty()).then(|| Record {
            text: std::mem::take(&mut self.buf),
            partial: false,
        })
    }
}

/// `t` in RFC 3339 with nanoseconds, UTC.
pub fn rfc3339_nano(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// One record as it is written to the log file.
pub fn format_record(t: SystemTime, stream: Stream, r: &Record) -> Vec<u8> {
    let tag = if r.partial { "P" } else { "F" };
    let mut out = format!("{} {} {tag} ", rfc3339_nano(t), stream.name()).into_bytes();
    out.extend_from_slice(&r.text);
    out.push(b'\n');
    out
}

/// A process's output FIFOs (paths for the shim, read ends for us).
pub struct OutputFifos {
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
    pub stdout: pipe::Receiver,
    pub stderr: pipe::Receiver,
}

/// A container's open log file, shared by its writer and ReopenContainerLog.
pub type LogFile = Arc<Mutex<std::fs::File>>;

/// Makes `<dir>/<prefix>-stdout` and `-stderr` FIFOs and opens their read ends (without
/// blocking: no writer exists yet). Must run inside the tokio runtime.
pub fn make_fifos(dir: &Path, prefix: &str) -> std::io::Result<OutputFifos> {
    let mode = nix::sys::stat::Mode::from_bits_truncate(0o600);
    for p in fifo_paths(dir, prefix) {
        nix::unistd::mkfifo(&p, mode).map_err(std::io::Error::from)?;
    }
    open_fifos(dir, prefix)
}

fn fifo_paths(dir: &Path, prefix: &str) -> [PathBuf; 2] {
    [
        dir.join(format!("{prefix}-stdout")),
        dir.join(format!("{prefix}-stderr")),
    ]
}

/// Opens the read ends of FIFOs [`make_fifos`] made earlier (by a huskd that has since
/// died). Must run inside the tokio runtime.
pub fn open_fifos(dir: &Path, prefix: &str) -> std::io::Result<OutputFifos> {
    let [stdout_path, stderr_path] = fifo_paths(dir, prefix);
    Ok(OutputFifos {
        stdout: pipe::OpenOptions::new().open_receiver(&stdout_path)?,
        stderr: pipe::OpenOptions::new().open_receiver(&stderr_path)?,
        stdout_path,
        stderr_path,
    })
}

/// Opens (appending, creating it and its directory) a container's log file.
pub fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// ReopenContainerLog: opens `path` afresh (creating it) and swaps it in under the lock, so
/// the next write goes there and the old file (renamed away by the caller, e.g. kubelet's
/// log rotation) gets none. When this returns the new file exists.
pub fn reopen(file: &LogFile, path: &Path) -> std::io::Result<()> {
    let new = open_log(path)?;
    let old = std::mem::replace(&mut *file.lock().expect("log file lock"), new);
    drop(old);
    Ok(())
}

async fn copy_stream(
    mut src: pipe::Receiver,
    stream: Stream,
    file: Option<LogFile>,
    fanout: Arc<Fanout>,
) {
    let mut split = LineSplitter::new(MAX_LINE);
    let mut buf = vec![0u8; 32 * 1024];
    let write = |records: Vec<Record>| {
        let Some(file) = &file else { return };
        let now = SystemTime::now();
        let mut data = Vec::new();
        for r in &records {
            data.extend_from_slice(&format_record(now, stream, r));
        }
        if data.is_empty() {
            return;
        }
        // One write per batch under the lock: records of the two streams never interleave.
        if let Err(e) = file.lock().expect("log file lock").write_all(&data) {
            warn!(stream = stream.name(), error = %e, "write the container log");
        }
    };
    loop {
        match src.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                fanout.send(stream, &buf[..n]);
                write(split.push(&buf[..n]));
            }
            Err(e) => {
                warn!(stream = stream.name(), error = %e, "read the container's output");
                break;
            }
        }
    }
    write(split.finish().into_iter().collect());
    fanout.close(stream);
}

/// Copies a container's output FIFOs into its CRI log file (or drains them when there is no
/// log file) and to the clients attached through `fanout`, until both reach EOF.
pub fn spawn_writer(
    file: Option<LogFile>,
    stdout: pipe::Receiver,
    stderr: pipe::Receiver,
    fanout: Arc<Fanout>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        tokio::join!(
            copy_stream(stdout, Stream::Stdout, file.clone(), fanout.clone()),
            copy_stream(stderr, Stream::Stderr, file, fanout)
        );
    })
}

/// Makes `<dir>/<prefix>-stdin`, a process's stdin FIFO; returns its path.
pub fn make_stdin_fifo(dir: &Path, prefix: &str) -> std::io::Result<PathBuf> {
    let p = stdin_path(dir, prefix);
    nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(std::io::Error::from)?;
    Ok(p)
}

pub fn stdin_path(dir: &Path, prefix: &str) -> PathBuf {
    dir.join(format!("{prefix}-stdin"))
}

/// Opens a stdin FIFO's write end. Read-write, so the open neither blocks nor fails for
/// want of a reader (the shim opens its read end only at Start); we never read from it.
/// Closing it is the process's EOF: the shim's reader then has no writer left. Must run
/// inside the tokio runtime.
pub fn open_stdin_writer(path: &Path) -> std::io::Result<pipe::Sender> {
    pipe::OpenOptions::new().read_write(true).open_sender(path)
}

/// Reads a FIFO to EOF, keeping at most `limit` bytes.
pub async fn read_all(mut src: pipe::Receiver, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match src.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = limit.saturating_sub(out.len());
                out.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rec(text: &str, partial: bool) -> Record {
        Record {
            text: text.as_bytes().to_vec(),
            partial,
        }
    }

    #[test]
    fn lines_split_into_full_and_partial_records() {
        let mut s = LineSplitter::new(4);
        assert_eq!(s.push(b"ab"), vec![]);
        assert_eq!(
            s.push(b"c\n\nabcd\n"),
            vec![rec("abc", false), rec("", false), rec("abcd", false)]
        );
        // Longer than the maximum: P records, the rest of the line an F.
        assert_eq!(
            s.push(b"0123456789\nxy"),
            vec![rec("0123", true), rec("4567", true), rec("89", false)]
        );
        // A long line whose end has not arrived yet.
        assert_eq!(s.push(b"zzzz"), vec![rec("xyzz", true)]);
        assert_eq!(s.finish(), Some(rec("zz", false)));
        assert_eq!(s.finish(), None);
        // A line of exactly the maximum stays one record.
        let mut s = LineSplitter::new(4);
        assert_eq!(s.push(b"abcd"), vec![]);
        assert_eq!(s.push(b"\n"), vec![rec("abcd", false)]);
    }

    #[test]
    fn timestamps_are_rfc3339_nano_utc() {
        let t = UNIX_EPOCH + Duration::new(0, 5);
        assert_eq!(rfc3339_nano(t), "1970-01-01T00:00:00.000000005Z");
        // 2024-02-29T23:59:59.123456789Z (a leap day)
        let t = UNIX_EPOCH + Duration::new(1_709_251_199, 123_456_789);
        assert_eq!(rfc3339_nano(t), "2024-02-29T23:59:59.123456789Z");
        let t = UNIX_EPOCH + Duration::new(1_735_689_600, 0);
        assert_eq!(rfc3339_nano(t), "2025-01-01T00:00:00.000000000Z");
    }

    #[test]
    fn records_have_the_cri_format() {
        let t = UNIX_EPOCH + Duration::new(1, 0);
        assert_eq!(
            format_record(t, Stream::Stderr, &rec("hi there", true)),
            b"1970-01-01T00:00:01.000000000Z stderr P hi there\n"
        );
        assert_eq!(
            format_record(t, Stream::Stdout, &rec("", false)),
            b"1970-01-01T00:00:01.000000000Z stdout F \n"
        );
    }

    #[tokio::test]
    async fn a_reopened_log_gets_the_output_after_it_and_the_old_file_none() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let f = make_fifos(dir.path(), "c").unwrap();
        let log = dir.path().join("c.log");
        let file = Arc::new(Mutex::new(open_log(&log).unwrap()));
        let task = spawn_writer(Some(file.clone()), f.stdout, f.stderr, Arc::default());
        let mut out = pipe::OpenOptions::new()
            .open_sender(&f.stdout_path)
            .unwrap();
        let wait_for = |p: PathBuf, text: &'static str| async move {
            for _ in 0..500 {
                if std::fs::read_to_string(&p)
                    .unwrap_or_default()
                    .contains(text)
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("{text:?} never reached {}", p.display());
        };
        out.write_all(b"before\n").await.unwrap();
        wait_for(log.clone(), "before").await;
        let rotated = dir.path().join("c.log.1");
        std::fs::rename(&log, &rotated).unwrap();
        reopen(&file, &log).unwrap();
        assert!(log.is_file(), "the new file exists when reopen returns");
        out.write_all(b"after\n").await.unwrap();
        drop(out);
        let _ = f.stderr_path;
        wait_for(log.clone(), "after").await;
        let new = std::fs::read_to_string(&log).unwrap();
        let old = std::fs::read_to_string(&rotated).unwrap();
        assert!(!new.contains("before"), "{new}");
        assert!(old.contains("before") && !old.contains("after"), "{old}");
        task.abort();
    }

    #[tokio::test]
    async fn the_writer_logs_both_fifos_until_eof() {
        let dir = tempfile::tempdir().unwrap();
        let f = make_fifos(dir.path(), "c").unwrap();
        let log = dir.path().join("logs/c.log");
        let file = Arc::new(Mutex::new(open_log(&log).unwrap()));
        // An attached client sees the same bytes as the log, and EOF with it.
        let fanout = Arc::new(Fanout::default());
        let (otx, mut orx) = tokio::sync::mpsc::channel(crate::fanout::SUBSCRIBER_BACKLOG);
        let (etx, mut erx) = tokio::sync::mpsc::channel(crate::fanout::SUBSCRIBER_BACKLOG);
        fanout.subscribe(Some(otx), Some(etx));
        let task = spawn_writer(Some(file), f.stdout, f.stderr, fanout.clone());
        let mut out = pipe::OpenOptions::new()
            .open_sender(&f.stdout_path)
            .unwrap();
        let mut err = pipe::OpenOptions::new()
            .open_sender(&f.stderr_path)
            .unwrap();
        use tokio::io::AsyncWriteExt;
        out.write_all(b"hello\nwor").await.unwrap();
        err.write_all(b"oops\n").await.unwrap();
        out.write_all(&vec![b'x'; MAX_LINE + 3]).await.unwrap();
        drop(out);
        drop(err);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the writer ends at EOF")
            .unwrap();
        let mut attached = Vec::new();
        while let Some(b) = orx.recv().await {
            attached.extend_from_slice(&b);
        }
        let mut want = b"hello\nwor".to_vec();
        want.extend_from_slice(&vec![b'x'; MAX_LINE + 3]);
        assert_eq!(attached, want, "the attached client's stdout");
        assert_eq!(erx.recv().await.unwrap(), "oops\n");
        assert_eq!(erx.recv().await, None);
        let text = std::fs::read_to_string(&log).unwrap();
        // (stream, tag, length, first bytes) per record, streams apart, each in order.
        let mut got: Vec<(String, String, usize, String)> = text
            .lines()
            .map(|l| {
                let mut p = l.splitn(4, ' ');
                let ts = p.next().unwrap();
                assert!(ts.ends_with('Z') && ts.len() == 30, "{ts}");
                let (stream, tag, t) = (p.next().unwrap(), p.next().unwrap(), p.next().unwrap());
                (
                    stream.into(),
                    tag.into(),
                    t.len(),
                    t.chars().take(5).collect(),
                )
            })
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        let r = |s: &str, t: &str, n: usize, head: &str| (s.into(), t.into(), n, head.into());
        let want: Vec<(String, String, usize, String)> = vec![
            r("stderr", "F", 4, "oops"),
            r("stdout", "F", 5, "hello"),
            r("stdout", "P", MAX_LINE, "worxx"),
            r("stdout", "F", 6, "xxxxx"),
        ];
        assert_eq!(got, want);
    }
}
