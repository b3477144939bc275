//! Request lines: the state rules behind them, malformed and oversized ones, and pipelining.

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::*;

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
