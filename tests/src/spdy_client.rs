//! A minimal SPDY/3.1 client for huskd's streaming URLs, on huskd's own frame codec: what
//! the benchmarks time (a node client's start-up would swamp an exec round trip). The
//! protocol tests use independent clients instead (`cri/tests/clients`).
//!
//! Like kubectl's spdystream it does no flow control (no WINDOW_UPDATE, no SETTINGS), which
//! huskd's session accepts by not enforcing its send window on such a peer.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use husk_cri::streaming::spdy::frame::{Frame, FrameDecoder, FrameEncoder, Headers, FLAG_FIN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long any one read may wait.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

pub struct SpdyClient {
    io: TcpStream,
    enc: FrameEncoder,
    dec: FrameDecoder,
    buf: BytesMut,
    next_id: u32,
}

/// A fault of the session, as text (this is test support).
pub type Result<T> = std::result::Result<T, String>;

impl SpdyClient {
    /// Upgrades `url` (`http://host:port/path`) to SPDY/3.1 asking for `protocol`.
    pub async fn connect(url: &str, protocol: &str) -> Result<SpdyClient> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("not an http URL: {url}"))?;
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let mut io = TcpStream::connect(host)
            .await
            .map_err(|e| format!("connect {host}: {e}"))?;
        io.set_nodelay(true).map_err(|e| e.to_string())?;
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
             X-Stream-Protocol-Version: {protocol}\r\nContent-Length: 0\r\n\r\n"
        );
        io.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 16 * 1024 {
                return Err("upgrade answer too long".into());
            }
            let n = tokio::time::timeout(READ_TIMEOUT, io.read_buf(&mut buf))
                .await
                .map_err(|_| "no upgrade answer".to_string())?
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed during the upgrade".into());
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        if !head.starts_with("HTTP/1.1 101") {
            return Err(format!("upgrade refused: {head}"));
        }
        let _ = buf.split_to(end);
        Ok(SpdyClient {
            io,
            enc: FrameEncoder::new(),
            dec: FrameDecoder::new(1 << 24, 64 * 1024),
            buf,
            next_id: 1,
        })
    }

    async fn send(&mut self, f: &Frame) -> Result<()> {
        let mut out = BytesMut::new();
        self.enc.encode(f, &mut out).map_err(|e| e.to_string())?;
        self.io.write_all(&out).await.map_err(|e| e.to_string())
    }

    /// Opens a stream with `headers`; its id.
    pub async fn open(&mut self, headers: &[(&str, &str)]) -> Result<u32> {
        let id = self.next_id;
        self.next_id += 2;
        let mut h = Headers::new();
        for (k, v) in headers {
            h = h.with(k, v);
        }
        self.send(&Frame::SynStream {
            stream_id: id,
            associated_id: 0,
            priority: 0,
            flags: 0,
            headers: h,
        })
        .await?;
        Ok(id)
    }

    /// Sends `data` on stream `id`, with FIN if `fin`.
    pub async fn data(&mut self, id: u32, data: &[u8], fin: bool) -> Result<()> {
        self.send(&Frame::Data {
            stream_id: id,
            flags: if fin { FLAG_FIN } else { 0 },
            data: Bytes::copy_from_slice(data),
        })
        .await
    }

    /// The next frame from the server; `None` once it closed the connection. PINGs are
    /// answered here.
    pub async fn next(&mut self) -> Result<Option<Frame>> {
        loop {
            if let Some(f) = self.dec.decode(&mut self.buf).map_err(|e| e.to_string())? {
                if let Frame::Ping { id } = f {
                    self.send(&Frame::Ping { id }).await?;
                    continue;
                }
                return Ok(Some(f));
            }
            let n = tokio::time::timeout(READ_TIMEOUT, self.io.read_buf(&mut self.buf))
                .await
                .map_err(|_| format!("nothing from the server in {READ_TIMEOUT:?}"))?
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok(None);
            }
        }
    }
}

/// Runs a non-interactive exec on an exec URL (stdout and stderr, protocol
/// `v4.channel.k8s.io`); returns the error stream's text (a `metav1.Status`), stdout and
/// stderr.
pub async fn exec(url: &str) -> Result<(String, Vec<u8>, Vec<u8>)> {
    let mut c = SpdyClient::connect(url, "v4.channel.k8s.io").await?;
    let error = c.open(&[("streamtype", "error")]).await?;
    let stdout = c.open(&[("streamtype", "stdout")]).await?;
    let stderr = c.open(&[("streamtype", "stderr")]).await?;
    let (mut err, mut out, mut errout) = (Vec::new(), Vec::new(), Vec::new());
    loop {
        match c.next().await? {
            Some(Frame::Data {
                stream_id,
                flags,
                data,
            }) => {
                let sink = match stream_id {
                    id if id == error => &mut err,
                    id if id == stdout => &mut out,
                    id if id == stderr => &mut errout,
                    _ => continue,
                };
                sink.extend_from_slice(&data);
                if stream_id == error && flags & FLAG_FIN != 0 {
                    break;
                }
            }
            Some(Frame::SynReply {
                stream_id, flags, ..
            }) if stream_id == error && flags & FLAG_FIN != 0 => break,
            Some(Frame::GoAway { .. }) | None => break,
            Some(_) => {}
        }
    }
    Ok((String::from_utf8_lossy(&err).into_owned(), out, errout))
}

/// Reads what `localhost:port` in the pod sends through one forwarded connection on a
/// port-forward URL, until it closes; returns the byte count (the bytes are dropped) and
/// the error stream's text.
pub async fn port_forward_read(url: &str, port: u16) -> Result<(u64, String)> {
    let mut c = SpdyClient::connect(url, "portforward.k8s.io").await?;
    let p = port.to_string();
    let error = c
        .open(&[("streamtype", "error"), ("port", &p), ("requestid", "0")])
        .await?;
    let data = c
        .open(&[("streamtype", "data"), ("port", &p), ("requestid", "0")])
        .await?;
    let (mut n, mut err) = (0u64, Vec::new());
    loop {
        match c.next().await? {
            Some(Frame::Data {
                stream_id,
                flags,
                data: d,
            }) => {
                if stream_id == data {
                    n += d.len() as u64;
                    if flags & FLAG_FIN != 0 {
                        break;
                    }
                } else if stream_id == error {
                    err.extend_from_slice(&d);
                }
            }
            Some(Frame::RstStream { stream_id, .. }) if stream_id == data => break,
            Some(Frame::GoAway { .. }) | None => break,
            Some(_) => {}
        }
    }
    Ok((n, String::from_utf8_lossy(&err).into_owned()))
}
