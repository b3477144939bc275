//! Round trips through a real socket and a real event manager, with a fake VMM behind them.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use serde_json::json;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
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

#[test]
fn configure_start_status_round_trip() {
    let h = Harness::new();
    let status: VmStatus = h.send(&Request::Status).parse_result().unwrap();
    assert_eq!(
        status,
        VmStatus {
            state: VmState::Configuring,
            exit_reason: None,
            boot_ms: None
        }
    );
    assert_eq!(h.send(&configure()), Response::ok());
    assert!(h.send(&add_block()).ok);
    assert!(h.send(&Request::Start).ok);
    let status: VmStatus = h.send(&Request::Status).parse_result().unwrap();
    assert_eq!(status.state, VmState::Running);
    assert_eq!(status.boot_ms, Some(42));
    // The handler got exactly what the client sent.
    let seen = h.seen();
    assert_eq!(seen[1], configure());
    assert_eq!(seen[2], add_block());
}

#[test]
fn life_cycle_and_changes_after_start_are_refused() {
    let h = Harness::new();
    assert!(h.send(&configure()).ok);
    let e = error_of(h.send(&Request::Pause));
    assert_eq!(e, "cannot pause the VM: it is configuring");
    assert!(h.send(&Request::Start).ok);

    let e = error_of(h.send(&add_block()));
    assert!(e.contains("add_block is only accepted before start"), "{e}");
    assert!(e.contains("running"), "{e}");
    let e = error_of(h.send(&configure()));
    assert!(e.contains("configure is only accepted before start"), "{e}");
    assert!(error_of(h.send(&Request::Start)).contains("cannot start the VM: it is running"));

    assert!(h.send(&Request::Pause).ok);
    assert!(h.send(&Request::Resume).ok);
    assert!(h.send(&Request::Shutdown).ok);
    let status: VmStatus = h.send(&Request::Status).parse_result().unwrap();
    assert_eq!(status.state, VmState::Exited);
    assert_eq!(status.exit_reason, Some(ExitReason::Api));
    let e = h
        .send(&Request::Resume)
        .parse_result::<VmStatus>()
        .unwrap_err();
    assert!(
        matches!(e, ApiError::Refused(ref m) if m.contains("exited")),
        "{e}"
    );
}

#[test]
fn tap_fd_travels_with_scm_rights() {
    let h = Harness::new();
    let (read_end, write_end) = pipe();
    let req = Request::AddNet(NetConfig {
        rx_rate_limiter: None,
        tx_rate_limiter: None,
        tap_name: None,
        tap_fd: Some(0),
        mac: Some(MacAddr([2, 0, 0, 0, 0, 1])),
    });
    let resp = request(&h.path, &req, &[write_end.as_fd()]).unwrap();
    assert_eq!(resp, Response::ok());
    // The VMM wrote through its copy of the fd and then closed it; ours is still open.
    drop(write_end);
    let mut got = String::new();
    File::from(read_end).read_to_string(&mut got).unwrap();
    assert_eq!(got, "hello from the vmm");
    assert_eq!(h.seen(), vec![req]);
}

#[test]
fn fds_with_a_request_that_takes_none_are_closed() {
    let h = Harness::new();
    let (read_end, write_end) = pipe();
    let resp = request(&h.path, &Request::Status, &[write_end.as_fd()]).unwrap();
    let e = error_of(resp);
    assert!(e.contains("status takes no file descriptors"), "{e}");
    drop(write_end);
    assert!(sees_eof(read_end), "the VMM kept a copy of the fd");
    // Refused by the protocol layer: the handler never saw it.
    assert!(h.seen().is_empty());
}

#[test]
fn tap_fd_index_must_match_the_fds_sent() {
    let h = Harness::new();
    let req = Request::AddNet(NetConfig {
        rx_rate_limiter: None,
        tx_rate_limiter: None,
        tap_name: None,
        tap_fd: Some(0),
        mac: None,
    });
    let e = error_of(h.send(&req));
    assert!(
        e.contains("tap_fd is 0 but 0 fd(s) came with the request"),
        "{e}"
    );
}

#[test]
fn too_many_fds_are_refused() {
    let h = Harness::new();
    let (_read_end, write_end) = pipe();
    let fds = vec![write_end.as_raw_fd(); MAX_FDS_PER_REQUEST + 4];
    // Our own client refuses to send them...
    let borrowed = vec![write_end.as_fd(); MAX_FDS_PER_REQUEST + 1];
    assert!(matches!(
        request(&h.path, &Request::Status, &borrowed),
        Err(ApiError::TooManyFds(17))
    ));
    // ...and the server copes with a client that does.
    let mut raw = h.raw();
    raw.stream
        .send_with_fds(&[&b"{\"op\":\"status\"}\n"[..]], &fds)
        .unwrap();
    let e = error_of(raw.response());
    assert!(e.contains("too many file descriptors"), "{e}");
    raw.write(b"{\"op\":\"status\"}\n");
    assert!(raw.response().ok);
}

#[test]
fn a_client_cannot_hoard_fds_in_an_unfinished_request() {
    let h = Harness::new();
    let (_read_end, write_end) = pipe();
    let fds = vec![write_end.as_raw_fd(); 4];
    let mut raw = h.raw();
    // 40 pieces of one request line, each with 4 fds: 160 fds offered.
    raw.stream.send_with_fds(&[&b"{"[..]], &fds).unwrap();
    for _ in 0..39 {
        raw.stream.send_with_fds(&[&b" "[..]], &fds).unwrap();
    }
    h.wait_for("all pieces read", |s| s.held_fds() == MAX_FDS_PER_REQUEST);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(h.server.lock().unwrap().held_fds(), MAX_FDS_PER_REQUEST);
    raw.write(b"\"op\":\"status\"}\n");
    let e = error_of(raw.response());
    assert!(e.contains("too many file descriptors"), "{e}");
    assert_eq!(h.server.lock().unwrap().held_fds(), 0);
    raw.write(b"{\"op\":\"status\"}\n");
    assert!(raw.response().ok);
}

#[test]
fn malformed_lines_get_errors_and_the_connection_survives() {
    let h = Harness::new();
    let mut c = h.raw();
    c.write(b"{not json\n");
    let e = error_of(c.response());
    assert!(e.starts_with("malformed request: "), "{e}");
    c.write(b"{\"op\":\"frobnicate\"}\n");
    let e = error_of(c.response());
    assert!(e.contains("unknown variant `frobnicate`"), "{e}");
    c.write(b"{\"op\":\"configure\",\"kernel\":\"/k\",\"vcpus\":1,\"serial\":\"none\"}\n");
    let e = error_of(c.response());
    assert!(e.contains("missing field `mem_mib`"), "{e}");
    c.write(b"{\"op\":\"add_block\",\"path\":\"/d\",\"read_only\":true,\"readonly\":true}\n");
    let e = error_of(c.response());
    assert!(e.contains("unknown field `readonly`"), "{e}");
    c.write(b"[1,2]\n");
    error_of(c.response());
    c.write(b"\xff\xfe\n");
    error_of(c.response());
    // Blank lines get no answer; CRLF is fine.
    c.write(b"\n  \n{\"op\":\"status\"}\r\n");
    assert!(c.response().ok);
    assert_eq!(h.seen(), vec![Request::Status]);
}

#[test]
fn oversized_line_is_refused_and_skipped() {
    let h = Harness::new();
    let mut c = h.raw();
    // 70 KiB of a string value, so the line would be valid JSON if it were allowed.
    let mut big = b"{\"op\":\"status\",\"x\":\"".to_vec();
    big.resize(70 * 1024, b'a');
    big.extend_from_slice(b"\"}\n{\"op\":\"status\"}\n");
    c.write(&big);
    let e = error_of(c.response());
    assert_eq!(e, "request too long: a request line may be at most 64 KiB");
    assert!(c.response().ok, "the line after the long one is served");

    // The same when the long line arrives slowly, with its fds, and the newline much later.
    let (read_end, write_end) = pipe();
    c.stream
        .send_with_fds(&[&[b'x'; 1024][..]], &[write_end.as_raw_fd()])
        .unwrap();
    drop(write_end);
    for _ in 0..80 {
        c.write(&[b'y'; 1024]);
    }
    let e = error_of(c.response());
    assert!(e.starts_with("request too long"), "{e}");
    assert!(sees_eof(read_end), "fds of a skipped line must be closed");
    c.write(b"zzz\n{\"op\":\"status\"}\n");
    assert!(c.response().ok);
    assert_eq!(h.seen().len(), 2);

    // A line of exactly the limit is still served.
    let mut edge = vec![b' '; MAX_REQUEST_SIZE - 15];
    edge.extend_from_slice(b"{\"op\":\"status\"}\n");
    assert_eq!(edge.len(), MAX_REQUEST_SIZE + 1);
    c.write(&edge);
    assert!(c.response().ok);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let h = Harness::new();
    let mut c = h.raw();
    c.write(b"{\"op\":\"start\"}\n{\"op\":\"status\"}\n{\"op\":\"pause\"}\n");
    // start before configure is fine for the fake; what matters is order.
    assert_eq!(c.response(), Response::ok());
    let status: VmStatus = c.response().parse_result().unwrap();
    assert_eq!(status.state, VmState::Running);
    assert_eq!(c.response(), Response::ok());
}

#[test]
fn two_clients_at_once() {
    let h = Harness::new();
    let mut a = ApiClient::connect(&h.path, DEFAULT_TIMEOUT).unwrap();
    let mut b = ApiClient::connect(&h.path, DEFAULT_TIMEOUT).unwrap();
    h.wait_for("two clients", |s| s.client_count() == 2);
    assert!(a.send(&configure(), &[]).unwrap().ok);
    assert!(b.send(&add_block(), &[]).unwrap().ok);
    // A half-written request on one connection does not hold up the other.
    let mut c = h.raw();
    c.write(b"{\"op\":\"sta");
    assert!(a.send(&Request::Start, &[]).unwrap().ok);
    let status: VmStatus = b
        .send(&Request::Status, &[])
        .unwrap()
        .parse_result()
        .unwrap();
    assert_eq!(status.state, VmState::Running);
    c.write(b"tus\"}\n");
    assert!(c.response().ok);
    drop((a, b, c));
    h.wait_for("clients to leave", |s| s.client_count() == 0);
}

#[test]
fn client_leaving_mid_request_leaves_nothing_behind() {
    let h = Harness::new();
    let (read_end, write_end) = pipe();
    {
        let c = h.raw();
        c.stream
            .send_with_fds(
                &[&b"{\"op\":\"add_net\",\"tap_fd\":0"[..]],
                &[write_end.as_raw_fd()],
            )
            .unwrap();
        h.wait_for("the client", |s| s.client_count() == 1);
    }
    drop(write_end);
    h.wait_for("the client to be dropped", |s| s.client_count() == 0);
    assert!(
        sees_eof(read_end),
        "the VMM kept the fd of an unfinished request"
    );
    assert!(h.seen().is_empty());
    // And the server still serves.
    assert!(h.send(&Request::Status).ok);
}

#[test]
fn too_many_clients_get_a_clear_error() {
    let h = Harness::new();
    let clients: Vec<_> = (0..MAX_CLIENTS).map(|_| h.raw()).collect();
    h.wait_for("all clients", |s| s.client_count() == MAX_CLIENTS);
    let mut extra = h.raw();
    let e = error_of(extra.response());
    assert!(e.contains("API clients connected"), "{e}");
    drop(clients);
    h.wait_for("clients to leave", |s| s.client_count() == 0);
    assert!(h.send(&Request::Status).ok);
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = TempDir::new_with_prefix("/tmp/husk-api-").unwrap();
    let path = dir.as_path().join("api.sock");
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "a dropped listener leaves its file");
    let h = Harness::serve(dir, path);
    assert!(h.send(&Request::Status).ok);
}

#[test]
fn live_socket_is_not_taken_over() {
    let h = Harness::new();
    match ApiServer::bind(&h.path, fake()) {
        Err(e @ ApiError::SocketInUse(_)) => {
            assert!(e.to_string().contains("another process is serving"), "{e}")
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("bound over a live socket"),
    }
    assert!(h.send(&Request::Status).ok, "the first server is unharmed");
}

#[test]
fn other_files_are_not_replaced() {
    let dir = TempDir::new_with_prefix("/tmp/husk-api-").unwrap();
    let path = dir.as_path().join("api.sock");
    std::fs::write(&path, "precious").unwrap();
    assert!(matches!(
        ApiServer::bind(&path, fake()),
        Err(ApiError::NotASocket(_))
    ));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

#[test]
fn socket_is_private_to_its_user() {
    use std::os::unix::fs::PermissionsExt;
    let h = Harness::new();
    let mode = std::fs::metadata(&h.path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn client_errors_name_the_socket() {
    let dir = TempDir::new_with_prefix("/tmp/husk-api-").unwrap();
    let path = dir.as_path().join("nobody.sock");
    let e = request(&path, &Request::Status, &[]).unwrap_err();
    assert!(matches!(e, ApiError::Connect { .. }), "{e}");
    assert!(e.to_string().contains("nobody.sock"), "{e}");
    let long = Path::new("/tmp").join("x".repeat(120));
    assert!(matches!(
        request(&long, &Request::Status, &[]),
        Err(ApiError::PathTooLong(_))
    ));
}

#[test]
fn silent_vmm_times_out() {
    let dir = TempDir::new_with_prefix("/tmp/husk-api-").unwrap();
    let path = dir.as_path().join("api.sock");
    // Connections complete in the backlog, but nobody ever answers.
    let _listener = UnixListener::bind(&path).unwrap();
    let start = Instant::now();
    let e =
        request_with_timeout(&path, &Request::Status, &[], Duration::from_millis(200)).unwrap_err();
    assert!(matches!(e, ApiError::Timeout { .. }), "{e}");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
}

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
