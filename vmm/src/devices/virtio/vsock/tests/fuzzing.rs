//! Random TX bytes and headers: the device must never panic on guest input.

use proptest::prelude::*;

use super::*;

/// Cuts `bytes` into up to `pieces` descriptors, some marked write-only.
fn tx_pieces(bytes: &[u8], cuts: &[usize], wo_mask: u8) -> Vec<(Vec<u8>, bool)> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    points.dedup();
    let mut out: Vec<(Vec<u8>, bool)> = points
        .windows(2)
        .enumerate()
        .map(|(i, w)| (bytes[w[0]..w[1]].to_vec(), wo_mask & (1 << (i % 8)) != 0))
        .collect();
    if out.is_empty() {
        out.push((Vec::new(), false));
    }
    out
}

fn feed(h: &mut Harness, pkts: &[(Vec<u8>, Vec<usize>, u8)]) {
    for (bytes, cuts, wo) in pkts {
        let pieces = tx_pieces(bytes, cuts, *wo);
        let refs: Vec<(&[u8], bool)> = pieces.iter().map(|(b, w)| (&b[..], *w)).collect();
        h.queue_tx_raw(&refs);
    }
    h.kick(TXQ);
    h.give_rx(8, 256);
    h.take_rx();
}

/// A header with plausible fields, so random input reaches the stream logic.
fn plausible_header() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just(GUEST_CID), any::<u64>()],
        prop_oneof![Just(HOST_CID), any::<u64>()],
        0u32..4,
        prop_oneof![0u32..4, Just(1 << 30), Just((1 << 30) + 1)],
        prop_oneof![0u32..300, any::<u32>()],
        0u16..3,
        0u16..9,
        0u32..4,
        any::<u32>(),
        any::<u32>(),
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(
            |(src_cid, dst_cid, sp, dp, len, ty, op, flags, ba, fc, payload)| {
                let hdr = VsockHeader {
                    src_cid,
                    dst_cid,
                    src_port: sp,
                    dst_port: dp,
                    len,
                    type_: ty,
                    op,
                    flags,
                    buf_alloc: ba,
                    fwd_cnt: fc,
                };
                let mut b = hdr.to_bytes().to_vec();
                b.extend(payload);
                b
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_tx_bytes_never_panic(
        pkts in proptest::collection::vec(
            (
                proptest::collection::vec(any::<u8>(), 0..200),
                proptest::collection::vec(any::<usize>(), 0..4),
                any::<u8>(),
            ),
            1..6,
        )
    ) {
        let mut h = Harness::with_mem(4 << 20);
        feed(&mut h, &pkts);
    }

    #[test]
    fn random_headers_never_panic(
        pkts in proptest::collection::vec(
            (
                plausible_header(),
                proptest::collection::vec(any::<usize>(), 0..3),
                prop_oneof![Just(0u8), any::<u8>()],
            ),
            1..12,
        )
    ) {
        let mut h = Harness::with_mem(4 << 20);
        h.give_rx(4, 4096);
        // Live streams for the random packets to hit (host ports 1<<30 and up, guest 0..4).
        let (_c1, _) = h.open_host_stream(1, CONN_BUF_ALLOC);
        let (_c2, _) = h.open_host_stream(2, 16);
        feed(&mut h, &pkts);
    }
}
