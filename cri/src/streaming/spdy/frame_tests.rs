use super::*;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn decode_all(dec: &mut FrameDecoder, bytes: &[u8]) -> Result<Vec<Frame>, FrameError> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(f) = dec.decode(&mut buf)? {
        out.push(f);
    }
    Ok(out)
}

fn dec() -> FrameDecoder {
    FrameDecoder::new(1 << 20, 64 * 1024)
}

/// Two SYN_STREAMs as a client sends them, compressed by C zlib (Python's `zlib` with
/// `zdict=` the SPDY/3 dictionary, level 9, SYNC_FLUSH per block), the second sharing the
/// first's compression context: an independent encoder, so these pin the dictionary and
/// the per-direction context.
const SYN1: &str = "80030001000000280000000100000000000078f9e3c6a7c202a62346703a2b294a4dcc851625aca9a08006000000ffff";
const SYN2: &str = "80030001010000280000000300000000600002651c0c2960624ec90797d1ec15bab9a5392599e082942109000000ffff";

#[test]
fn recorded_syn_streams_from_c_zlib() {
    let mut d = dec();
    let mut bytes = hex(SYN1);
    bytes.extend(hex(SYN2));
    let frames = decode_all(&mut d, &bytes).unwrap();
    assert_eq!(
        frames,
        vec![
            Frame::SynStream {
                stream_id: 1,
                associated_id: 0,
                priority: 0,
                flags: 0,
                headers: Headers::new().with("streamtype", "error"),
            },
            Frame::SynStream {
                stream_id: 3,
                associated_id: 0,
                priority: 3,
                flags: FLAG_FIN,
                headers: Headers(vec![
                    ("streamtype".into(), vec!["stdout".into()]),
                    ("x-multi".into(), vec!["a".into(), "b".into()]),
                ]),
            },
        ]
    );
}

#[test]
fn second_block_alone_fails_without_the_first_context() {
    // The second block refers back into the first's window: decoding it on a fresh
    // context must fail (a zlib header is missing), never yield wrong headers.
    let mut d = dec();
    assert!(decode_all(&mut d, &hex(SYN2)).is_err());
}

#[test]
fn recorded_control_frames() {
    let mut d = dec();
    let all = [
        hex("800300060000000400000001"),                 // PING 1
        hex("80030003000000080000000500000005"),         // RST_STREAM 5 CANCEL
        hex("8003000900000008000000070000ffff"),         // WINDOW_UPDATE 7 += 65535
        hex("80030007000000080000000900000000"),         // GOAWAY last 9 OK
        hex("800300040100000c000000010100000700010000"), // SETTINGS clear, 1 entry
    ]
    .concat();
    let frames = decode_all(&mut d, &all).unwrap();
    assert_eq!(
        frames,
        vec![
            Frame::Ping { id: 1 },
            Frame::RstStream {
                stream_id: 5,
                status: rst::CANCEL
            },
            Frame::WindowUpdate {
                stream_id: 7,
                delta: 65535
            },
            Frame::GoAway {
                last_good_stream_id: 9,
                status: goaway::OK
            },
            Frame::Settings {
                flags: 1,
                entries: vec![(1, SETTINGS_INITIAL_WINDOW_SIZE, 0x0001_0000)]
            },
        ]
    );
}

#[test]
fn recorded_data_frames() {
    let mut d = dec();
    let frames = decode_all(&mut d, &hex("000000010100000268690000000300000000")).unwrap();
    assert_eq!(
        frames,
        vec![
            Frame::Data {
                stream_id: 1,
                flags: FLAG_FIN,
                data: Bytes::from_static(b"hi")
            },
            Frame::Data {
                stream_id: 3,
                flags: 0,
                data: Bytes::new()
            },
        ]
    );
}

#[test]
fn encoding_matches_the_recorded_bytes() {
    let mut e = FrameEncoder::new();
    let mut out = BytesMut::new();
    e.encode(&Frame::Ping { id: 1 }, &mut out).unwrap();
    e.encode(
        &Frame::Data {
            stream_id: 1,
            flags: FLAG_FIN,
            data: Bytes::from_static(b"hi"),
        },
        &mut out,
    )
    .unwrap();
    e.encode(
        &Frame::RstStream {
            stream_id: 5,
            status: rst::CANCEL,
        },
        &mut out,
    )
    .unwrap();
    assert_eq!(
        out.to_vec(),
        [
            hex("800300060000000400000001"),
            hex("00000001010000026869"),
            hex("80030003000000080000000500000005")
        ]
        .concat()
    );
}

#[test]
fn every_frame_round_trips() {
    let frames = vec![
        Frame::SynStream {
            stream_id: 1,
            associated_id: 0,
            priority: 2,
            flags: FLAG_FIN | FLAG_UNIDIRECTIONAL,
            headers: Headers::new()
                .with("streamType", "stdin")
                .with("port", "80"),
        },
        Frame::SynReply {
            stream_id: 1,
            flags: 0,
            headers: Headers::new(),
        },
        Frame::Headers {
            stream_id: 1,
            flags: FLAG_FIN,
            headers: Headers::new().with("a", ""),
        },
        Frame::Data {
            stream_id: 0x7fff_ffff,
            flags: 0,
            data: Bytes::from(vec![7u8; 70_000]),
        },
        Frame::RstStream {
            stream_id: 3,
            status: rst::PROTOCOL_ERROR,
        },
        Frame::Settings {
            flags: 0,
            entries: vec![(0, 4, 100), (0, SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20)],
        },
        Frame::Ping { id: 2 },
        Frame::GoAway {
            last_good_stream_id: 5,
            status: goaway::PROTOCOL_ERROR,
        },
        Frame::WindowUpdate {
            stream_id: 1,
            delta: 10,
        },
    ];
    let mut e = FrameEncoder::new();
    let mut out = BytesMut::new();
    for f in &frames {
        e.encode(f, &mut out).unwrap();
    }
    let got = decode_all(&mut dec(), &out).unwrap();
    // Names go out lower-cased.
    let mut want = frames.clone();
    if let Frame::SynStream { headers, .. } = &mut want[0] {
        headers.0[0].0 = "streamtype".into();
    }
    assert_eq!(got, want);
}

#[test]
fn partial_input_waits_for_more() {
    let bytes = hex(SYN1);
    let mut d = dec();
    let mut buf = BytesMut::new();
    for (i, b) in bytes.iter().enumerate() {
        buf.put_u8(*b);
        let f = d.decode(&mut buf).unwrap();
        assert_eq!(f.is_some(), i == bytes.len() - 1, "at byte {i}");
    }
}

#[test]
fn oversized_frame_is_refused_before_buffering() {
    let mut d = FrameDecoder::new(1024, 1024);
    // A DATA header announcing 16 MiB - 1 with no body: refused at once, not awaited.
    let mut buf = BytesMut::from(&hex("0000000100ffffff")[..]);
    assert_eq!(
        d.decode(&mut buf),
        Err(FrameError::TooLong {
            len: MAX_WIRE_LEN,
            limit: 1024
        })
    );
}

#[test]
fn header_block_inflating_past_the_limit() {
    let mut e = FrameEncoder::new();
    let mut out = BytesMut::new();
    let big = "v".repeat(100_000);
    e.encode(
        &Frame::SynStream {
            stream_id: 1,
            associated_id: 0,
            priority: 0,
            flags: 0,
            headers: Headers::new().with("x", &big),
        },
        &mut out,
    )
    .unwrap();
    assert!(out.len() < 4096, "compressed to {}", out.len());
    let mut d = FrameDecoder::new(1 << 20, 64 * 1024);
    assert_eq!(
        decode_all(&mut d, &out),
        Err(FrameError::Zlib(ZlibError::TooLarge { limit: 64 * 1024 }))
    );
}

#[test]
fn lying_header_counts_and_lengths() {
    assert!(parse_header_block(&hex("ffffffff")).is_err());
    assert!(parse_header_block(&hex("00000001000000ff61")).is_err());
    assert!(parse_header_block(&hex("0000000100000001610000ffff")).is_err());
    // duplicate name
    assert!(parse_header_block(&hex("00000002000000016100000000000000016100000000")).is_err());
    // trailing bytes
    assert!(parse_header_block(&hex("000000000a")).is_err());
    // a good one
    assert_eq!(
        parse_header_block(&hex("00000001000000016100000001")).unwrap_err(),
        "value of 1 bytes runs past the block"
    );
    assert_eq!(
        parse_header_block(&hex("0000000100000001610000000162")).unwrap(),
        Headers::new().with("a", "b")
    );
}

#[test]
fn malformed_control_frames() {
    for bad in [
        "80030006000000050000000100",               // PING of 5 bytes
        "80030003000000080000000000000001",         // RST on stream 0
        "80030009000000080000000100000000",         // WINDOW_UPDATE delta 0
        "800200060000000400000001",                 // SPDY/2, whole
        "800300040000000c000000050000000000000000", // SETTINGS count lies
        "00000000000000016100",                     // DATA on stream 0
    ] {
        assert!(
            decode_all(&mut dec(), &hex(bad)).is_err(),
            "{bad} should be refused"
        );
    }
}

#[test]
fn unknown_control_type_is_skipped() {
    let frames = decode_all(
        &mut dec(),
        &hex("800300ff00000002abcd800300060000000400000003"),
    )
    .unwrap();
    assert_eq!(
        frames,
        vec![Frame::Unknown { frame_type: 0xff }, Frame::Ping { id: 3 }]
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

    /// Any bytes: each decode is Ok or Err, never a panic, and an Ok(None) means the
    /// buffer does not hold a whole frame.
    #[test]
    fn any_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
        let mut d = FrameDecoder::new(4096, 4096);
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = d.decode(&mut buf) {}
    }

    /// Frames that start valid and then are corrupted (a flipped byte) still never panic,
    /// including inside a compressed header block.
    #[test]
    fn corrupted_frames_never_panic(idx in 0usize..48, val in proptest::num::u8::ANY) {
        let mut bytes = hex(SYN1);
        bytes.extend(hex(SYN2));
        let i = idx % bytes.len();
        bytes[i] = val;
        let mut d = FrameDecoder::new(4096, 4096);
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = d.decode(&mut buf) {}
    }

    /// Whatever headers we encode decode to the same thing.
    #[test]
    fn headers_round_trip(pairs in proptest::collection::btree_map("[a-z][a-z0-9-]{0,12}", "[ -~]{0,40}", 0..8)) {
        let h = Headers(pairs.into_iter().map(|(k, v)| (k, vec![v])).collect());
        let mut e = FrameEncoder::new();
        let mut out = BytesMut::new();
        let f = Frame::SynReply { stream_id: 1, flags: 0, headers: h };
        e.encode(&f, &mut out).unwrap();
        let got = decode_all(&mut dec(), &out).unwrap();
        proptest::prop_assert_eq!(got, vec![f]);
    }
}
