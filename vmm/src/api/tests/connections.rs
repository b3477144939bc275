//! Several clients at once, clients leaving mid-request, and the cap on clients.

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::*;

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
