//! Host processes with a deadline: a test must not wait forever on a process (or a
//! pipe) whose VM died quietly; it fails with what the process printed instead.
use std::io::{Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What a process printed and how it ended.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

fn collect(mut r: impl Read + Send + 'static) -> (Arc<Mutex<Vec<u8>>>, JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    let t = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    (buf, t)
}

fn text(b: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&b.lock().unwrap()).into_owned()
}

/// Runs `cmd` with `stdin` as its input (none: /dev/null) and its output captured, and
/// waits for it and for the end of its output. Once `limit` has passed, kills it and
/// panics with what it printed so far.
pub fn output_within(cmd: &mut Command, stdin: Option<&[u8]>, limit: Duration) -> Output {
    let prog = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {prog}: {e}"));
    if let Some(data) = stdin {
        let mut w = child.stdin.take().expect("stdin piped");
        let data = data.to_vec();
        // A thread, so that a child that does not read cannot block us past the deadline.
        std::thread::spawn(move || {
            let _ = w.write_all(&data);
        });
    }
    let (out, out_t) = collect(child.stdout.take().expect("stdout piped"));
    let (err, err_t) = collect(child.stderr.take().expect("stderr piped"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for the child") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{prog} did not end within {} s\n--- stdout so far ---\n{}\n--- stderr so far ---\n{}",
                limit.as_secs(),
                text(&out),
                text(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // A process it left behind may still hold the pipes.
    while !out_t.is_finished() || !err_t.is_finished() {
        assert!(
            Instant::now() < deadline,
            "{prog} ended ({status}), but its output did not within {} s\n--- stdout so far ---\n{}\n--- stderr so far ---\n{}",
            limit.as_secs(),
            text(&out),
            text(&err)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let stdout = std::mem::take(&mut *out.lock().unwrap());
    let stderr = std::mem::take(&mut *err.lock().unwrap());
    Output {
        status,
        stdout,
        stderr,
    }
}

/// The first `n` bytes of `r` (all of it to EOF when `n` is None) within `limit`, or
/// an error saying what came instead. On a timeout the reading thread is left behind,
/// blocked until the pipe closes.
pub fn read_within(
    r: impl Read + Send + 'static,
    n: Option<usize>,
    limit: Duration,
) -> Result<Vec<u8>, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let r = match n {
            Some(n) => r.take(n as u64).read_to_end(&mut buf),
            None => {
                let mut r = r;
                r.read_to_end(&mut buf)
            }
        };
        let _ = tx.send(r.map(|_| buf));
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(b)) if n.is_none_or(|n| b.len() == n) => Ok(b),
        Ok(Ok(b)) => Err(format!(
            "EOF after {:?} instead of {} bytes",
            String::from_utf8_lossy(&b),
            n.unwrap_or_default()
        )),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("nothing within {} s", limit.as_secs())),
    }
}

#[cfg(test)]
mod tests {
    use super::{output_within, read_within};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    #[test]
    fn output_within_collects_output_status_and_stdin() {
        let o = output_within(
            Command::new("sh").args(["-c", "cat; echo err >&2; exit 3"]),
            Some(b"in\n"),
            Duration::from_secs(30),
        );
        assert_eq!(o.status.code(), Some(3));
        assert_eq!(o.stdout, b"in\n");
        assert_eq!(o.stderr, b"err\n");
    }

    #[test]
    #[should_panic(expected = "did not end within 1 s")]
    fn output_within_kills_a_process_past_its_deadline() {
        output_within(
            Command::new("sh").args(["-c", "echo started; exec sleep 30"]),
            None,
            Duration::from_secs(1),
        );
    }

    #[test]
    fn read_within_gives_up_on_a_silent_pipe() {
        let mut child = Command::new("sleep")
            .arg("30")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let t = Instant::now();
        let r = read_within(
            child.stdout.take().unwrap(),
            Some(3),
            Duration::from_secs(1),
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(r, Err("nothing within 1 s".to_string()));
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
