//! Parsing of TX descriptor chains into packets, malformed ones included.

use super::*;

#[test]
fn header_round_trips() {
    let hdr = VsockHeader {
        src_cid: 0x0102_0304_0506_0708,
        dst_cid: 2,
        src_port: 0xdead_beef,
        dst_port: 7,
        len: 9,
        type_: TYPE_STREAM,
        op: OP_RW,
        flags: 3,
        buf_alloc: 0x1234,
        fwd_cnt: 0x5678,
    };
    let b = hdr.to_bytes();
    assert_eq!(&b[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
    assert_eq!(&b[28..30], &1u16.to_le_bytes());
    assert_eq!(VsockHeader::from_bytes(&b), hdr);
}

#[test]
fn parses_header_and_payload_split_across_descriptors() {
    let mem = standalone_mem();
    let q = MockSplitQueue::new(mem, 16);
    let mut hdr = ghdr(1, 2, OP_RW);
    hdr.len = 10;
    let mut bytes = hdr.to_bytes().to_vec();
    bytes.extend_from_slice(b"0123456789");
    // 10 | 34 (rest of header) + 3 | 7: the header spans two descriptors and the payload
    // starts in the middle of one.
    let cuts = [(0, 10), (10, 47), (47, 54)];
    let descs: Vec<RawDescriptor> = cuts
        .iter()
        .enumerate()
        .map(|(i, &(s, e))| {
            let addr = 0x1_0000 + 0x1000 * i as u64;
            mem.write_slice(&bytes[s..e], GuestAddress(addr)).unwrap();
            RawDescriptor::from(SplitDescriptor::new(addr, (e - s) as u32, 0, 0))
        })
        .collect();
    let chain = q.build_desc_chain(&descs).unwrap();
    let (got, data) = read_tx_packet(mem, chain).unwrap();
    assert_eq!(got, hdr);
    assert_eq!(data, b"0123456789");
}

#[test]
fn malformed_chains_are_errors_not_panics() {
    let mem = standalone_mem();
    let q = MockSplitQueue::new(mem, 16);
    let one = |addr: u64, len: u32, flags: u16| {
        vec![RawDescriptor::from(SplitDescriptor::new(
            addr, len, flags, 0,
        ))]
    };

    // Too short for a header.
    let chain = q.build_desc_chain(&one(0x1_0000, 20, 0)).unwrap();
    assert!(matches!(
        read_tx_packet(mem, chain),
        Err(VsockError::HeaderTooShort { have: 20 })
    ));

    // `len` larger than the buffers.
    let mut hdr = ghdr(1, 2, OP_RW);
    hdr.len = 100;
    mem.write_slice(&hdr.to_bytes(), GuestAddress(0x2_0000))
        .unwrap();
    let chain = q
        .build_desc_chain(&one(0x2_0000, HDR_SIZE as u32 + 10, 0))
        .unwrap();
    match read_tx_packet(mem, chain) {
        Err(VsockError::PayloadTruncated { len, have, .. }) => {
            assert_eq!((len, have), (100, 10));
        }
        other => panic!("{other:?}"),
    }

    // `len` over the cap, whatever the buffers hold.
    hdr.len = u32::MAX;
    mem.write_slice(&hdr.to_bytes(), GuestAddress(0x2_0000))
        .unwrap();
    let chain = q.build_desc_chain(&one(0x2_0000, 0x8_0000, 0)).unwrap();
    assert!(matches!(
        read_tx_packet(mem, chain),
        Err(VsockError::PayloadTooLarge { .. })
    ));

    // Header in a write-only descriptor: the device must not read it.
    let chain = q
        .build_desc_chain(&one(0x2_0000, 4096, VRING_DESC_F_WRITE as u16))
        .unwrap();
    assert!(matches!(
        read_tx_packet(mem, chain),
        Err(VsockError::HeaderTooShort { have: 0 })
    ));

    // Buffer outside guest memory.
    let chain = q.build_desc_chain(&one(0xfff_0000, 4096, 0)).unwrap();
    assert!(matches!(
        read_tx_packet(mem, chain),
        Err(VsockError::DescriptorChain(_))
    ));
}

#[test]
fn truncated_packet_on_the_queue_gets_rst() {
    let mut h = Harness::new();
    h.give_rx(4, 4096);
    let mut hdr = ghdr(77, 88, OP_RW);
    hdr.len = 1000;
    // Claims 1000 bytes, carries 5.
    let mut bytes = hdr.to_bytes().to_vec();
    bytes.extend_from_slice(b"short");
    h.queue_tx_raw(&[(&bytes, false)]);
    // Too short to hold a header at all: dropped, nobody to answer.
    h.queue_tx_raw(&[(&[1, 2, 3], false)]);
    h.kick(TXQ);
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].hdr.op, OP_RST);
    assert_eq!((pkts[0].hdr.src_port, pkts[0].hdr.dst_port), (88, 77));
    // Both TX chains were returned to the guest.
    assert_eq!(h.rings[TXQ].used().len(), 2);
}
