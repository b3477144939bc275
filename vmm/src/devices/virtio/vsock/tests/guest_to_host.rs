//! Streams the guest opens to host port listeners, and packets for no stream at all.

use std::os::unix::net::UnixListener;

use super::*;

#[test]
fn guest_initiated_stream_reaches_the_port_listener() {
    let mut h = Harness::new();
    h.give_rx(16, 4096);
    let listener = UnixListener::bind(format!("{}_5000", h.uds().display())).unwrap();

    h.send(ghdr(2000, 5000, OP_REQUEST), &[]);
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    let resp = pkts[0].hdr;
    assert_eq!(resp.op, OP_RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port), (5000, 2000));
    assert_eq!((resp.src_cid, resp.dst_cid), (HOST_CID, GUEST_CID));

    let (mut srv, _) = listener.accept().unwrap();
    srv.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    h.send(ghdr(2000, 5000, OP_RW), b"ping");
    let mut buf = [0u8; 4];
    srv.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    srv.write_all(b"pong").unwrap();
    h.pump();
    let pkts = h.take_rx();
    assert_eq!(data_of(&pkts), b"pong");
    assert_eq!((pkts[0].hdr.src_port, pkts[0].hdr.dst_port), (5000, 2000));

    // Guest half-close: the host reads EOF but can still send.
    let mut sd = ghdr(2000, 5000, OP_SHUTDOWN);
    sd.flags = SHUTDOWN_F_SEND;
    h.send(sd, &[]);
    assert_eq!(srv.read(&mut buf).unwrap(), 0);
    srv.write_all(b"still here").unwrap();
    h.pump();
    assert_eq!(data_of(&h.take_rx()), b"still here");
}

/// A guest stream to the host port the next host client would get must not be replaced by
/// that client's stream (same key): both live, on different host ports.
#[test]
fn host_ports_never_collide_with_guest_streams() {
    let mut h = Harness::new();
    h.give_rx(16, 4096);
    let first_host_port = 1u32 << 30;
    let _listener = UnixListener::bind(format!("{}_{first_host_port}", h.uds().display())).unwrap();
    h.send(ghdr(3000, first_host_port, OP_REQUEST), &[]);
    assert_eq!(h.take_rx()[0].hdr.op, OP_RESPONSE);
    let (_client, host_port) = h.open_host_stream(3000, 4096);
    assert_ne!(host_port, first_host_port);
    assert_eq!(h.dev().muxer().conn_count(), 2);
}

#[test]
fn guest_connect_to_nothing_gets_rst() {
    let mut h = Harness::new();
    h.give_rx(4, 4096);
    h.send(ghdr(2001, 5001, OP_REQUEST), &[]);
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].hdr.op, OP_RST);
    assert_eq!((pkts[0].hdr.src_port, pkts[0].hdr.dst_port), (5001, 2001));
    assert_eq!(h.dev().muxer().conn_count(), 0);
}

#[test]
fn misaddressed_and_unknown_packets() {
    let mut h = Harness::new();
    h.give_rx(8, 4096);
    // Wrong source CID, wrong destination CID: ignored.
    let mut p = ghdr(1, 2, OP_REQUEST);
    p.src_cid = 42;
    h.send(p, &[]);
    let mut p = ghdr(1, 2, OP_REQUEST);
    p.dst_cid = 7;
    h.send(p, &[]);
    assert!(h.take_rx().is_empty());
    // Unknown type: RST.
    let mut p = ghdr(1, 2, OP_REQUEST);
    p.type_ = 2;
    h.send(p, &[]);
    // Data for a stream that does not exist: RST. RST for one: nothing.
    h.send(ghdr(3, 4, OP_RW), b"x");
    h.send(ghdr(5, 6, OP_RST), &[]);
    let pkts = h.take_rx();
    let ops: Vec<_> = pkts
        .iter()
        .map(|p| (p.hdr.op, p.hdr.src_port, p.hdr.dst_port))
        .collect();
    assert_eq!(ops, vec![(OP_RST, 2, 1), (OP_RST, 4, 3)]);
}

#[test]
fn guest_without_rx_buffers_is_throttled_not_queued_for() {
    let mut h = Harness::new();
    // Data for streams that do not exist: each one earns the guest an RST it has no buffer
    // for.
    let mut port = 0;
    for _ in 0..5 {
        for _ in 0..250 {
            port += 1;
            let mut hdr = ghdr(port, 1, OP_RW);
            hdr.len = 1;
            let mut bytes = hdr.to_bytes().to_vec();
            bytes.push(b'x');
            h.queue_tx_raw(&[(&bytes, false)]);
        }
        h.kick(TXQ);
    }
    h.rings[TXQ].used();
    // The device stopped reading TX once its backlog was full.
    assert_eq!(
        h.rings[TXQ].outstanding(),
        1250 - super::muxer::MAX_CTRL_BACKLOG
    );

    // RX buffers let it catch up, and every packet gets its answer.
    let mut rsts = 0;
    for _ in 0..20 {
        h.give_rx(200, 256);
        rsts += h.take_rx().iter().filter(|p| p.hdr.op == OP_RST).count();
        if rsts == 1250 {
            break;
        }
    }
    assert_eq!(rsts, 1250);
    h.rings[TXQ].used();
    assert_eq!(h.rings[TXQ].outstanding(), 0);
}
