//! A virtiofsd that stalls, exits, serves too few queues, or is not there at all.

use std::os::unix::net::UnixListener;

use super::*;

/// A virtiofsd that stops answering (SIGSTOP) costs the vCPU thread nothing: activation only
/// queues the exchange, and the device's mutex, which the event loop needs, stays free while
/// the worker waits. The watchdog then ends the exchange and the device is marked broken.
#[test]
fn a_stalled_virtiofsd_blocks_neither_the_vcpu_nor_the_device() {
    let vfs = Virtiofsd::start();
    let timeouts = Timeouts {
        connect: CONNECT_TIMEOUT,
        exchange: Duration::from_millis(500),
    };
    let mut guest = Guest::connect_with(&vfs, timeouts);
    let pid = vfs.child.id() as libc::pid_t;
    // SAFETY: signals to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let t = Instant::now();
    guest.start_activation();
    assert!(
        t.elapsed() < Duration::from_millis(250),
        "activation waited for virtiofsd: {:?}",
        t.elapsed()
    );
    // The worker is now blocked on virtiofsd; the lock is still ours to take at once.
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    let fs = guest.fs.lock().unwrap();
    assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
    assert!(
        !fs.broken.load(Ordering::SeqCst),
        "failed before the timeout"
    );
    drop(fs);
    guest.fs.lock().unwrap().wait_backend();
    assert!(
        guest.fs.lock().unwrap().broken.load(Ordering::SeqCst),
        "a stalled exchange must leave the device broken"
    );
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    // A broken device refuses a reset instead of talking to virtiofsd again.
    assert!(!guest.fs.lock().unwrap().reset());
}

#[test]
fn virtiofsd_exit_is_reported() {
    let mut vfs = Virtiofsd::start();
    let mut guest = Guest::connect(&vfs);
    guest.activate();
    let flag = guest.fs.lock().unwrap().backend_gone_flag();
    assert!(!flag.load(Ordering::SeqCst));
    vfs.kill();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !flag.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "hang-up not noticed within 5 s");
        guest.em.run_with_timeout(50).unwrap();
    }
    // The loop stops watching the dead socket instead of spinning on it.
    assert_eq!(guest.em.run_with_timeout(0).unwrap(), 0);
}

#[test]
fn more_request_queues_than_virtiofsd_serves_is_refused() {
    let vfs = Virtiofsd::start();
    let err = Fs::new(&vfs.socket, "husk", 2, QSIZE)
        .err()
        .expect("2 request queues");
    assert!(
        matches!(err, FsError::TooManyQueues { wanted: 3, max: 2 }),
        "{err}"
    );
}

#[test]
fn nobody_listening_fails_clearly_in_bounded_time() {
    let dir = TempDir::new_with_prefix("/tmp/husk-fs-nolisten-").unwrap();

    // No socket file at all.
    let start = Instant::now();
    let err = Fs::new(dir.as_path().join("absent.sock"), "husk", 1, QSIZE)
        .err()
        .expect("no socket");
    assert!(start.elapsed() < CONNECT_TIMEOUT + Duration::from_secs(2));
    assert!(matches!(err, FsError::Connect { .. }), "{err}");
    assert!(
        err.to_string().contains("cannot connect to virtiofsd"),
        "{err}"
    );

    // A stale socket file whose listener is gone (connection refused).
    let stale = dir.as_path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let timeouts = Timeouts {
        connect: Duration::from_millis(200),
        exchange: Duration::from_millis(300),
    };
    let start = Instant::now();
    let err = Fs::with_timeouts(&stale, "husk", 1, QSIZE, timeouts)
        .err()
        .expect("stale socket");
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(matches!(err, FsError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("Connection refused"), "{err}");

    // A listener that never accepts nor answers: connect succeeds, the handshake must not hang.
    let silent = dir.as_path().join("silent.sock");
    let _listener = UnixListener::bind(&silent).unwrap();
    let start = Instant::now();
    let err = Fs::with_timeouts(&silent, "husk", 1, QSIZE, timeouts)
        .err()
        .expect("silent listener");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(matches!(err, FsError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("did not answer"), "{err}");
}
