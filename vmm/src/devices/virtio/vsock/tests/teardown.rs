//! Closing streams from either side, their timeouts, device reset, and many streams at once.

use std::time::Instant;

use super::*;
use crate::devices::virtio::vsock::connection::{REQUEST_TIMEOUT, SHUTDOWN_TIMEOUT};

#[test]
fn host_close_sends_shutdown_then_guest_rst_closes() {
    let mut h = Harness::new();
    h.give_rx(8, 4096);
    let (mut client, port) = h.open_host_stream(1024, CONN_BUF_ALLOC);
    client.write_all(b"last words").unwrap();
    drop(client);
    h.pump();
    let pkts = h.take_rx();
    assert_eq!(data_of(&pkts), b"last words");
    let last = pkts.last().unwrap().hdr;
    assert_eq!(last.op, OP_SHUTDOWN);
    assert_eq!(last.flags, SHUTDOWN_F_BOTH);
    assert_eq!(h.dev().muxer().conn_count(), 1);
    h.send(ghdr(1024, port, OP_RST), &[]);
    assert_eq!(h.dev().muxer().conn_count(), 0);
    assert!(h.take_rx().is_empty());
}

#[test]
fn shutdown_the_guest_never_finishes_times_out_with_rst() {
    let mut h = Harness::new();
    h.give_rx(8, 4096);
    let (client, port) = h.open_host_stream(1024, CONN_BUF_ALLOC);
    drop(client);
    h.pump();
    assert_eq!(h.take_rx().last().unwrap().hdr.op, OP_SHUTDOWN);
    let deadline = Instant::now() + SHUTDOWN_TIMEOUT + Duration::from_secs(3);
    let rst = loop {
        assert!(
            Instant::now() < deadline,
            "no RST after the shutdown timeout"
        );
        h.pump_wait(500);
        if let Some(p) = h.take_rx().into_iter().find(|p| p.hdr.op == OP_RST) {
            break p;
        }
    };
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (port, 1024));
    assert_eq!(h.dev().muxer().conn_count(), 0);
}

#[test]
fn unanswered_request_times_out() {
    let mut h = Harness::new();
    h.give_rx(8, 4096);
    let mut client = UnixStream::connect(h.uds()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    h.pump();
    let req = h.take_rx()[0].hdr;
    assert_eq!(req.op, OP_REQUEST);
    let deadline = Instant::now() + REQUEST_TIMEOUT + Duration::from_secs(3);
    while h.dev().muxer().conn_count() > 0 {
        assert!(Instant::now() < deadline, "request never timed out");
        h.pump_wait(500);
    }
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].hdr.op, OP_RST);
    assert_eq!(pkts[0].hdr.src_port, req.src_port);
    let mut buf = [0u8; 4];
    assert_eq!(client.read(&mut buf).unwrap(), 0);
}

#[test]
fn guest_shutdown_flushes_then_resets() {
    let mut h = Harness::new();
    h.give_rx(8, 4096);
    let (mut client, port) = h.open_host_stream(1024, CONN_BUF_ALLOC);
    h.send(ghdr(1024, port, OP_RW), b"bye");
    let mut sd = ghdr(1024, port, OP_SHUTDOWN);
    sd.flags = SHUTDOWN_F_BOTH;
    h.send(sd, &[]);
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].hdr.op, OP_RST);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
    assert_eq!(h.dev().muxer().conn_count(), 0);
}

#[test]
fn guest_close_waits_for_a_slow_host_reader() {
    let mut h = Harness::new();
    h.give_rx(8, 4096);
    let (mut slow, port) = h.open_host_stream(1024, CONN_BUF_ALLOC);
    // Fill the host socket and our buffer, as far as the guest's credit goes.
    let (_, sent, _) = send_until_out_of_credit(&mut h, 1024, port);
    let mut sd = ghdr(1024, port, OP_SHUTDOWN);
    sd.flags = SHUTDOWN_F_BOTH;
    h.send(sd, &[]);
    // The host reader sleeps past the guest-RST timeout; its bytes must still be there.
    let idle_until = Instant::now() + SHUTDOWN_TIMEOUT + Duration::from_millis(500);
    while Instant::now() < idle_until {
        h.pump_wait(100);
    }
    assert_eq!(
        h.dev().muxer().conn_count(),
        1,
        "stream dropped with bytes owed"
    );
    slow.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut buf = [0u8; 65536];
        match slow.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => h.pump_wait(20),
            Err(e) => panic!("host read: {e}"),
        }
        assert!(Instant::now() < deadline, "got {} of {sent}", got.len());
    }
    assert_eq!(got.len(), sent as usize);
    assert!(h.take_rx().iter().any(|p| p.hdr.op == OP_RST));
    assert_eq!(h.dev().muxer().conn_count(), 0);
}

#[test]
fn reset_closes_streams_and_reactivation_works() {
    let mut h = Harness::new();
    h.give_rx(8, 4096);
    let (mut client, _) = h.open_host_stream(1024, CONN_BUF_ALLOC);
    let old_kicks: Vec<EventFd> = h.kicks.iter().map(|k| k.try_clone().unwrap()).collect();
    assert!(h.dev().reset());
    assert!(!h.dev().is_activated());
    // A late notification on the old queues must not wedge the event loop.
    old_kicks[RXQ].write(1).unwrap();
    old_kicks[TXQ].write(1).unwrap();
    h.pump();
    let mut buf = [0u8; 4];
    assert_eq!(client.read(&mut buf).unwrap(), 0);

    // Not listening while reset: the client waits in the backlog.
    let mut waiting = UnixStream::connect(h.uds()).unwrap();
    waiting.write_all(b"CONNECT 1024\n").unwrap();
    h.pump();

    h.activate();
    assert!(h.dev().is_activated());
    h.give_rx(8, 4096);
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].hdr.op, OP_REQUEST);
    // The new queues' notifications are wired up.
    h.send(guest_reply(&pkts[0].hdr, OP_RESPONSE), &[]);
    waiting
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(
        read_line(&mut waiting),
        format!("OK {}\n", pkts[0].hdr.src_port)
    );
}

#[test]
fn many_concurrent_streams() {
    let mut h = Harness::new();
    h.give_rx(128, 4096);
    let mut streams: Vec<(UnixStream, u32, u32)> = (0..40)
        .map(|i| {
            let (c, port) = h.open_host_stream(3000 + i, CONN_BUF_ALLOC);
            (c, port, 3000 + i)
        })
        .collect();
    for (c, _, gp) in &mut streams {
        c.write_all(format!("from host {gp}").as_bytes()).unwrap();
    }
    h.pump();
    h.give_rx(64, 4096);
    let pkts = h.take_rx();
    for (c, port, gp) in &mut streams {
        let data: Vec<u8> = pkts
            .iter()
            .filter(|p| p.hdr.src_port == *port && p.hdr.op == OP_RW)
            .flat_map(|p| p.data.clone())
            .collect();
        assert_eq!(data, format!("from host {gp}").as_bytes());
        h.send(ghdr(*gp, *port, OP_RW), format!("to {gp}").as_bytes());
        let mut buf = vec![0u8; format!("to {gp}").len()];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(buf, format!("to {gp}").as_bytes());
    }
}
