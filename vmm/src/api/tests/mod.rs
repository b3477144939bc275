//! Round trips through a real socket and a real event manager, with a fake VMM behind them.
//! This module holds the fake, the server harness and the raw client; the tests are in the
//! submodules, except the seccomp pair at the end.

mod connections;
mod fd_passing;
mod requests;
mod socket;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use serde_json::json;
use vmm_sys_util::tempdir::TempDir;

use super::*;

/// A VMM stand-in: follows the protocol's state rules and records what it was asked.
struct Fake {
    state: VmState,
    exit_reason: Option<ExitReason>,
    seen: Vec<Request>,
}

impl ApiHandler for Fake {
    fn handle(&mut self, req: Request, mut fds: Vec<OwnedFd>) -> Response {
        self.seen.push(req.clone());
        if let Err(msg) = req.check_state(self.state) {
            return Response::error(msg);
        }
        match req {
            Request::AddNet(NetConfig {
                rx_rate_limiter: None,
                tx_rate_limiter: None,
                tap_fd: Some(i),
                ..
            }) => {
                // Prove the fd is usable here: write through it.
                let mut tap = File::from(fds.swap_remove(i));
                match tap.write_all(b"hello from the vmm") {
                    Ok(()) => Response::ok(),
                    Err(e) => Response::error(format!("tap fd: {e}")),
                }
            }
            Request::Start => {
                self.state = VmState::Running;
                Response::ok()
            }
            Request::Pause => {
                self.state = VmState::Paused;
                Response::ok()
            }
            Request::Resume => {
                self.state = VmState::Running;
                Response::ok()
            }
            Request::Shutdown => {
                self.state = VmState::Exited;
                self.exit_reason = Some(ExitReason::Api);
                Response::ok()
            }
            Request::Status => Response::ok_with(&VmStatus {
                state: self.state,
                exit_reason: self.exit_reason,
                boot_ms: (self.state != VmState::Configuring).then_some(42),
            }),
            _ => Response::ok(),
        }
    }
}

fn fake() -> Fake {
    Fake {
        state: VmState::Configuring,
        exit_reason: None,
        seen: Vec::new(),
    }
}

type Server = Arc<Mutex<ApiServer<Fake>>>;

/// An API server on its own event loop thread, as the VMM will run it.
struct Harness {
    _dir: TempDir,
    path: PathBuf,
    server: Server,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Harness {
    fn new() -> Harness {
        let dir = TempDir::new_with_prefix("/tmp/husk-api-").unwrap();
        let path = dir.as_path().join("api.sock");
        Self::serve(dir, path)
    }

    fn serve(dir: TempDir, path: PathBuf) -> Harness {
        Self::serve_filtered(dir, path, false)
    }

    /// With `seccomp`, the event-loop thread runs under the VMM's seccomp filter, as in the VMM.
    fn serve_filtered(dir: TempDir, path: PathBuf, seccomp: bool) -> Harness {
        let server = Arc::new(Mutex::new(ApiServer::bind(&path, fake()).unwrap()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let server = Arc::clone(&server);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut em = EventManager::<Server>::new().unwrap();
                em.add_subscriber(server);
                if seccomp {
                    crate::seccomp::install(crate::seccomp::ThreadKind::Vmm).unwrap();
                }
                while !stop.load(Ordering::SeqCst) {
                    em.run_with_timeout(10).unwrap();
                }
            })
        };
        Harness {
            _dir: dir,
            path,
            server,
            stop,
            thread: Some(thread),
        }
    }

    fn send(&self, req: &Request) -> Response {
        request(&self.path, req, &[]).unwrap()
    }

    fn raw(&self) -> RawClient {
        let stream = UnixStream::connect(&self.path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        RawClient {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
        }
    }

    /// Waits until the server (between event-loop rounds) satisfies `cond`.
    fn wait_for(&self, what: &str, cond: impl Fn(&ApiServer<Fake>) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond(&self.server.lock().unwrap()) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn seen(&self) -> Vec<Request> {
        self.server.lock().unwrap().handler().seen.clone()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A client that writes raw bytes, to speak the protocol badly.
struct RawClient {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl RawClient {
    fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn response(&mut self) -> Response {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        assert!(line.ends_with('\n'), "no complete response line: {line:?}");
        serde_json::from_str(&line).unwrap()
    }
}

fn error_of(resp: Response) -> String {
    assert!(!resp.ok, "expected an error, got {resp:?}");
    assert!(resp.result.is_none());
    resp.error.unwrap()
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(ret, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: pipe2 succeeded, so both are fresh fds owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Whether the pipe's read end sees end-of-file (every write end closed) within 5 s.
fn sees_eof(read_end: OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: read_end.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut pfd, 1, 5000) };
    if ready != 1 {
        return false;
    }
    let mut buf = [0u8; 64];
    File::from(read_end).read(&mut buf).unwrap() == 0
}

/// A `configure` as a client sends it on the wire.
fn configure() -> Request {
    serde_json::from_value(json!({
        "op": "configure", "kernel": "/boot/vmlinux", "initramfs": "/boot/initrd",
        "cmdline": "console=ttyS0 quiet", "mem_mib": 512, "vcpus": 2,
        "serial": {"file": "/var/log/vm.log"}
    }))
    .expect("a valid configure request")
}

fn add_block() -> Request {
    Request::AddBlock(BlockConfig {
        rate_limiter: None,
        path: "/disk.img".into(),
        read_only: true,
        id: None,
    })
}

// The seccomp pair stays in this module: the parent test re-runs the child by its full test
// path, `api::tests::child_serves_under_the_vmm_filter`.

/// Set in the environment of the re-executed test binary for `child_serves_under_the_vmm_filter`.
const CHILD_ENV: &str = "HUSK_API_TEST_CHILD";

#[test]
#[ignore = "runs in a child process, from serves_under_the_vmm_seccomp_filter"]
fn child_serves_under_the_vmm_filter() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    // If the filter kills us, no core file.
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscall with a valid struct; lowering a limit needs no privilege.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) }, 0);
    let dir = TempDir::new_with_prefix("/tmp/husk-api-").unwrap();
    let path = dir.as_path().join("api.sock");
    let h = Harness::serve_filtered(dir, path, true);
    // Every path of the server once: requests, fds, bad lines, long lines, several clients, a
    // client that leaves mid-request.
    assert!(h.send(&configure()).ok);
    let (read_end, write_end) = pipe();
    let req = Request::AddNet(NetConfig {
        rx_rate_limiter: None,
        tx_rate_limiter: None,
        tap_name: None,
        tap_fd: Some(0),
        mac: None,
    });
    assert!(request(&h.path, &req, &[write_end.as_fd()]).unwrap().ok);
    drop(write_end);
    let mut got = String::new();
    File::from(read_end).read_to_string(&mut got).unwrap();
    assert_eq!(got, "hello from the vmm");
    let mut c = h.raw();
    c.write(b"{oops\n");
    error_of(c.response());
    c.write(&vec![b'x'; 70 * 1024]);
    c.write(b"\n{\"op\":\"start\"}\n");
    error_of(c.response());
    assert!(c.response().ok);
    let mut other = h.raw();
    other.write(b"{\"op\":\"status\"}\n");
    assert!(other.response().ok);
    drop(other);
    c.write(b"{\"op\":");
    drop(c);
    h.wait_for("clients to leave", |s| s.client_count() == 0);
    let status: VmStatus = h.send(&Request::Status).parse_result().unwrap();
    assert_eq!(status.state, VmState::Running);
}

#[test]
fn serves_under_the_vmm_seccomp_filter() {
    let name = "api::tests::child_serves_under_the_vmm_filter";
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            name,
            "--exact",
            "--ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD_ENV, "1")
        .env_remove(crate::seccomp::MODE_ENV)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{:?}\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains(&format!("{name} ... ok")), "{stdout}");
}
