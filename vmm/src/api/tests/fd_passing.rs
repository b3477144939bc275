//! File descriptors sent with requests: delivered when wanted, closed otherwise, and capped.

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::*;

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
