//! The socket file (stale, live, not a socket, its mode) and what the client reports when
//! nobody serves it.

use std::os::unix::net::UnixListener;
use std::path::Path;

use super::*;

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
