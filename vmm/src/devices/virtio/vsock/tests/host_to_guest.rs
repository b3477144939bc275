//! Streams a host client opens with the CONNECT handshake on the device's socket.

use std::io::ErrorKind;

use super::*;

#[test]
fn host_initiated_stream_carries_data_both_ways() {
    let mut h = Harness::new();
    h.give_rx(16, 4096);
    // Drain the activation interrupt.
    let _ = h.irq.evt.read();

    let mut client = UnixStream::connect(h.uds()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Stream bytes right behind the CONNECT line must not be eaten by the handshake.
    client.write_all(b"CONNECT 1024\nearly bird").unwrap();
    h.pump();
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    let req = pkts[0].hdr;
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!(req.type_, TYPE_STREAM);
    assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(req.dst_port, 1024);
    assert!(req.src_port >= 1 << 30);
    assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
    // The guest was interrupted for it.
    assert!(h.irq.evt.read().unwrap() >= 1);

    h.send(guest_reply(&req, OP_RESPONSE), &[]);
    assert_eq!(read_line(&mut client), format!("OK {}\n", req.src_port));

    // Host → guest, including the bytes sent with the CONNECT line.
    h.pump();
    client.write_all(b", hello guest").unwrap();
    h.pump();
    let pkts = h.take_rx();
    assert!(pkts
        .iter()
        .all(|p| p.hdr.op == OP_RW && p.hdr.src_port == req.src_port && p.hdr.dst_port == 1024));
    assert_eq!(data_of(&pkts), b"early bird, hello guest");

    // Guest → host.
    h.send(guest_reply(&req, OP_RW), b"hello host");
    let mut buf = [0u8; 10];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");
    assert_eq!(h.dev().muxer().conn_count(), 1);
}

#[test]
fn guest_refusing_a_host_stream_closes_the_client() {
    let mut h = Harness::new();
    h.give_rx(4, 4096);
    let mut client = UnixStream::connect(h.uds()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(b"CONNECT 9\n").unwrap();
    h.pump();
    let req = h.take_rx()[0].hdr;
    h.send(guest_reply(&req, OP_RST), &[]);
    let mut buf = [0u8; 8];
    assert_eq!(client.read(&mut buf).unwrap(), 0);
    assert_eq!(h.dev().muxer().conn_count(), 0);
}

#[test]
fn bad_handshakes_are_dropped() {
    let mut h = Harness::new();
    h.give_rx(4, 4096);
    for line in [
        &b"HELLO 5\n"[..],
        b"CONNECT\n",
        b"CONNECT abc\n",
        &[b'x'; 100],
    ] {
        let mut client = UnixStream::connect(h.uds()).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client.write_all(line).unwrap();
        h.pump();
        let mut buf = [0u8; 8];
        // Unread bytes left behind make the close a reset.
        match client.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("{line:?}: {other:?}"),
        }
    }
    assert!(h.take_rx().is_empty());
}

#[test]
fn request_without_rx_buffers_waits_for_them() {
    let mut h = Harness::new();
    let mut client = UnixStream::connect(h.uds()).unwrap();
    client.write_all(b"CONNECT 7\n").unwrap();
    h.pump();
    assert!(h.take_rx().is_empty());
    h.give_rx(1, 4096);
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].hdr.op, OP_REQUEST);
}
