//! Credit-based flow control, both ways, and its effect on other streams.

use std::io::ErrorKind;
use std::time::Instant;

use super::*;

#[test]
fn never_sends_more_than_the_guest_credit() {
    let mut h = Harness::new();
    h.give_rx(32, 4096);
    let (mut client, port) = h.open_host_stream(1024, 1000);
    let payload: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    client.write_all(&payload).unwrap();
    h.pump();
    h.give_rx(8, 4096);
    let got = data_of(&h.take_rx());
    assert_eq!(got.len(), 1000, "credit was 1000 bytes");

    // The guest consumed 1000 bytes and says so.
    let mut cu = ghdr(1024, port, OP_CREDIT_UPDATE);
    cu.buf_alloc = 1000;
    cu.fwd_cnt = 1000;
    h.send(cu, &[]);
    let more = data_of(&h.take_rx());
    assert_eq!(more.len(), 1000);

    // A bigger buffer: the rest flows, bounded by the RX buffer size per packet.
    cu.buf_alloc = 1 << 20;
    cu.fwd_cnt = 2000;
    h.send(cu, &[]);
    let pkts = h.take_rx();
    assert!(pkts.iter().all(|p| p.data.len() <= 4096 - HDR_SIZE));
    let rest = data_of(&pkts);
    let all: Vec<u8> = got.into_iter().chain(more).chain(rest).collect();
    assert_eq!(all, payload);

    // The guest asks for our credit.
    h.send(ghdr(1024, port, OP_CREDIT_REQUEST), &[]);
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].hdr.op, OP_CREDIT_UPDATE);
    assert_eq!(pkts[0].hdr.buf_alloc, CONN_BUF_ALLOC);
}

#[test]
fn guest_overrunning_its_credit_is_reset() {
    let mut h = Harness::new();
    h.give_rx(32, 4096);
    let (mut client, port) = h.open_host_stream(1024, CONN_BUF_ALLOC);
    // The client never reads: once its socket buffer is full, everything goes to the
    // device's buffer, which must stay within the credit it advertised.
    let chunk = vec![7u8; MAX_PKT_PAYLOAD];
    let mut reset = false;
    for _ in 0..64 {
        h.send(ghdr(1024, port, OP_RW), &chunk);
        if h.take_rx().iter().any(|p| p.hdr.op == OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "a guest ignoring credit must be reset");
    assert_eq!(h.dev().muxer().conn_count(), 0);
    // The client sees the stream end after what was delivered.
    client.set_nonblocking(true).unwrap();
    let mut sink = Vec::new();
    let _ = client.read_to_end(&mut sink);
}

#[test]
fn slow_host_reader_does_not_stall_other_streams() {
    let mut h = Harness::new();
    h.give_rx(64, 4096);
    let (mut slow, slow_port) = h.open_host_stream(1000, CONN_BUF_ALLOC);
    let (mut fast, fast_port) = h.open_host_stream(1001, CONN_BUF_ALLOC);

    // The guest sends to the slow stream for as long as its credit lasts, as a driver does.
    let (chunk, sent, mut peer_fwd) = send_until_out_of_credit(&mut h, 1000, slow_port);
    assert!(sent >= CONN_BUF_ALLOC, "sent {sent}");

    // The other stream is unaffected, both ways.
    h.send(ghdr(1001, fast_port, OP_RW), b"fast lane");
    let mut buf = [0u8; 9];
    fast.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"fast lane");
    fast.write_all(b"reply").unwrap();
    h.pump();
    let pkts = h.take_rx();
    let fast_data: Vec<u8> = pkts
        .iter()
        .filter(|p| p.hdr.src_port == fast_port)
        .flat_map(|p| p.data.clone())
        .collect();
    assert_eq!(fast_data, b"reply");

    // The slow reader wakes up and gets every byte, in order; the guest hears about the
    // freed space.
    slow.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut saw_credit = false;
    while got.len() < sent as usize {
        assert!(Instant::now() < deadline, "got {} of {sent}", got.len());
        let mut buf = vec![0u8; 64 * 1024];
        match slow.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        h.pump_wait(1);
        h.top_up_rx(16, 4096);
        for p in h.take_rx() {
            if p.hdr.src_port == slow_port && p.hdr.fwd_cnt != peer_fwd {
                saw_credit = true;
                peer_fwd = p.hdr.fwd_cnt;
            }
        }
    }
    assert_eq!(got.len(), sent as usize);
    assert!(got.chunks(chunk.len()).all(|c| c == &chunk[..c.len()]));
    assert!(saw_credit, "no credit update after the host drained");
    // The guest may not hear about the last few bytes, but it has ample credit again.
    assert!(sent - peer_fwd < CONN_BUF_ALLOC / 4, "{sent} {peer_fwd}");
}
