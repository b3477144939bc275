//! Session tests: a scripted client built from the codec, over an in-memory pipe.

use super::read::reply_headers;
use super::*;
use crate::streaming::spdy::frame::{rst, FrameDecoder, SETTINGS_INITIAL_WINDOW_SIZE};
use tokio::io::AsyncReadExt;
use tokio::io::DuplexStream;

struct Client {
    io: DuplexStream,
    enc: FrameEncoder,
    dec: FrameDecoder,
    buf: BytesMut,
}

impl Client {
    fn new(io: DuplexStream) -> Self {
        Self {
            io,
            enc: FrameEncoder::new(),
            dec: FrameDecoder::new(1 << 20, 64 * 1024),
            buf: BytesMut::new(),
        }
    }

    async fn send(&mut self, f: Frame) {
        let mut b = BytesMut::new();
        self.enc.encode(&f, &mut b).unwrap();
        self.io.write_all(&b).await.unwrap();
    }

    /// Next frame other than a WINDOW_UPDATE or one of the server's PINGs.
    async fn next(&mut self) -> Option<Frame> {
        loop {
            match self.next_any().await? {
                Frame::WindowUpdate { .. } => continue,
                Frame::Ping { id } if id % 2 == 0 => continue,
                f => return Some(f),
            }
        }
    }

    async fn next_any(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = self.dec.decode(&mut self.buf).unwrap() {
                return Some(f);
            }
            let n = tokio::time::timeout(Duration::from_secs(5), self.io.read_buf(&mut self.buf))
                .await
                .expect("server answers within 5 s")
                .unwrap();
            if n == 0 {
                return None;
            }
        }
    }

    async fn open(&mut self, id: u32, kind: &str) {
        self.send(Frame::SynStream {
            stream_id: id,
            associated_id: 0,
            priority: 0,
            flags: 0,
            headers: Headers::new().with("streamType", kind),
        })
        .await;
        assert_eq!(
            self.next().await,
            Some(Frame::SynReply {
                stream_id: id,
                flags: 0,
                headers: reply_headers()
            })
        );
    }
}

fn pair(cfg: SessionConfig) -> (Session, Client) {
    let (a, b) = tokio::io::duplex(1 << 20);
    (Session::start(a, cfg), Client::new(b))
}

fn quiet() -> SessionConfig {
    SessionConfig {
        ping_interval: None,
        close_linger: Duration::from_millis(100),
        ..Default::default()
    }
}

#[tokio::test]
async fn stream_data_both_ways_and_fin() {
    let (mut s, mut c) = pair(quiet());
    c.open(1, "stdout").await;
    let mut st = s.accept().await.unwrap();
    assert_eq!(st.id, 1);
    assert_eq!(st.headers.get("streamtype"), Some("stdout"));
    c.send(Frame::Data {
        stream_id: 1,
        flags: FLAG_FIN,
        data: Bytes::from_static(b"in"),
    })
    .await;
    assert_eq!(st.reader.recv().await.unwrap(), Bytes::from_static(b"in"));
    assert!(
        st.reader.recv().await.is_none(),
        "FIN ends the inbound half"
    );
    st.writer.write_all(b"out").await.unwrap();
    st.writer.finish().await.unwrap();
    assert_eq!(
        c.next().await,
        Some(Frame::Data {
            stream_id: 1,
            flags: 0,
            data: Bytes::from_static(b"out")
        })
    );
    assert_eq!(
        c.next().await,
        Some(Frame::Data {
            stream_id: 1,
            flags: FLAG_FIN,
            data: Bytes::new()
        })
    );
    s.close().await;
    // GOAWAY names the last stream the client opened, although it is finished.
    assert_eq!(
        c.next().await,
        Some(Frame::GoAway {
            last_good_stream_id: 1,
            status: goaway::OK,
        })
    );
    assert_eq!(c.next().await, None, "socket closed after GOAWAY");
}

#[tokio::test]
async fn client_ping_is_echoed() {
    let (_s, mut c) = pair(quiet());
    c.send(Frame::Ping { id: 7 }).await;
    assert_eq!(c.next().await, Some(Frame::Ping { id: 7 }));
}

#[tokio::test]
async fn server_pings_with_even_ids() {
    let (_s, mut c) = pair(SessionConfig {
        ping_interval: Some(Duration::from_millis(20)),
        ..quiet()
    });
    let Some(Frame::Ping { id }) = c.next_any().await else {
        panic!("expected a PING")
    };
    assert_eq!(id % 2, 0);
}

#[tokio::test]
async fn send_window_is_honoured_once_the_peer_does_flow_control() {
    let (mut s, mut c) = pair(quiet());
    c.send(Frame::Settings {
        flags: 0,
        entries: vec![(0, SETTINGS_INITIAL_WINDOW_SIZE, 10)],
    })
    .await;
    c.open(1, "stdout").await;
    let st = s.accept().await.unwrap();
    let w = st.writer.clone();
    let send = tokio::spawn(async move { w.write_all(&[b'x'; 25]).await });
    let Some(Frame::Data { data, .. }) = c.next().await else {
        panic!()
    };
    assert_eq!(data.len(), 10, "no more than the window");
    // Nothing more until the window opens.
    assert!(tokio::time::timeout(Duration::from_millis(100), c.next())
        .await
        .is_err());
    c.send(Frame::WindowUpdate {
        stream_id: 1,
        delta: 100,
    })
    .await;
    let Some(Frame::Data { data, .. }) = c.next().await else {
        panic!()
    };
    assert_eq!(data.len(), 15);
    send.await.unwrap().unwrap();
}

#[tokio::test]
async fn without_flow_control_from_the_peer_large_writes_go_through() {
    // Go's spdystream never sends WINDOW_UPDATE: 200 KiB must still arrive.
    let (mut s, mut c) = pair(quiet());
    c.open(1, "stdout").await;
    let st = s.accept().await.unwrap();
    let w = st.writer.clone();
    tokio::spawn(async move { w.write_all(&vec![1u8; 200 * 1024]).await });
    let mut got = 0;
    while got < 200 * 1024 {
        let Some(Frame::Data { data, .. }) = c.next().await else {
            panic!()
        };
        got += data.len();
    }
    assert_eq!(got, 200 * 1024);
}

#[tokio::test]
async fn received_data_is_acknowledged() {
    let (mut s, mut c) = pair(quiet());
    c.open(1, "stdin").await;
    let mut st = s.accept().await.unwrap();
    tokio::spawn(async move { while st.reader.recv().await.is_some() {} });
    c.send(Frame::Data {
        stream_id: 1,
        flags: 0,
        data: Bytes::from(vec![0u8; 40_000]),
    })
    .await;
    let mut session_ack = 0;
    let mut stream_ack = 0;
    // 40000 bytes pass half of both windows: one update each, of everything received.
    while session_ack < 40_000 || stream_ack < 40_000 {
        match c.next_any().await.unwrap() {
            Frame::WindowUpdate {
                stream_id: 0,
                delta,
            } => session_ack += delta,
            Frame::WindowUpdate {
                stream_id: 1,
                delta,
            } => stream_ack += delta,
            f => panic!("unexpected {f:?}"),
        }
    }
}

#[tokio::test]
async fn reset_by_peer_fails_writes() {
    let (mut s, mut c) = pair(quiet());
    c.open(1, "stdout").await;
    let mut st = s.accept().await.unwrap();
    c.send(Frame::RstStream {
        stream_id: 1,
        status: rst::CANCEL,
    })
    .await;
    assert!(st.reader.recv().await.is_none());
    assert!(st.writer.write_all(b"x").await.is_err());
}

#[tokio::test]
async fn even_or_reused_stream_id_is_a_session_error() {
    let (mut s, mut c) = pair(quiet());
    c.open(3, "a").await;
    let _st = s.accept().await.unwrap();
    c.send(Frame::SynStream {
        stream_id: 1,
        associated_id: 0,
        priority: 0,
        flags: 0,
        headers: Headers::new(),
    })
    .await;
    assert!(matches!(
        c.next().await,
        Some(Frame::GoAway {
            status: goaway::PROTOCOL_ERROR,
            ..
        })
    ));
    assert_eq!(c.next().await, None);
}

#[tokio::test]
async fn garbage_gets_goaway_and_close() {
    let (_s, mut c) = pair(quiet());
    c.io.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(matches!(
        c.next().await,
        Some(Frame::GoAway {
            status: goaway::PROTOCOL_ERROR,
            ..
        })
    ));
    assert_eq!(c.next().await, None);
}

#[tokio::test]
async fn too_many_streams_are_refused() {
    let (mut s, mut c) = pair(SessionConfig {
        max_streams: 1,
        ..quiet()
    });
    c.open(1, "a").await;
    let _a = s.accept().await.unwrap();
    c.send(Frame::SynStream {
        stream_id: 3,
        associated_id: 0,
        priority: 0,
        flags: 0,
        headers: Headers::new(),
    })
    .await;
    assert_eq!(
        c.next().await,
        Some(Frame::RstStream {
            stream_id: 3,
            status: rst::REFUSED_STREAM
        })
    );
}

#[tokio::test]
async fn data_on_unknown_stream_is_reset() {
    let (_s, mut c) = pair(quiet());
    c.send(Frame::Data {
        stream_id: 9,
        flags: 0,
        data: Bytes::from_static(b"x"),
    })
    .await;
    assert_eq!(
        c.next().await,
        Some(Frame::RstStream {
            stream_id: 9,
            status: rst::INVALID_STREAM
        })
    );
}
