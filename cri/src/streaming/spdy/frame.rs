//! SPDY/3.1 frames: parsing from and serialising to bytes.
//!
//! Wire format (SPDY/3.1 draft, section 2.2): a control frame starts with the control bit,
//! a 15-bit version (3) and a 16-bit type; a data frame with a 31-bit stream id. Both then
//! carry 8 bits of flags and a 24-bit length. Header blocks (SYN_STREAM, SYN_REPLY,
//! HEADERS) are zlib-compressed with one context per direction (see `zlib.rs`), so frames
//! must be decoded and encoded in connection order by a single owner.
//!
//! Decoding never trusts a length: the frame length is checked against `max_frame_len`
//! before anything is buffered, header counts and string lengths are checked against the
//! bytes actually inflated, and the inflated block is capped (see `HeaderInflater`).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::zlib::{HeaderDeflater, HeaderInflater, ZlibError};

pub const VERSION: u16 = 3;
pub const FLAG_FIN: u8 = 0x01;
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// Largest length the 24-bit field can carry.
pub const MAX_WIRE_LEN: usize = (1 << 24) - 1;
/// SETTINGS id of the initial per-stream window (SPDY/3.1 section 2.6.4).
pub const SETTINGS_INITIAL_WINDOW_SIZE: u32 = 7;

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

/// RST_STREAM status codes (section 2.6.3).
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const CANCEL: u32 = 5;
    pub const INTERNAL_ERROR: u32 = 6;
    pub const FLOW_CONTROL_ERROR: u32 = 7;
    pub const STREAM_IN_USE: u32 = 8;
    pub const STREAM_ALREADY_CLOSED: u32 = 9;
    pub const FRAME_TOO_LARGE: u32 = 11;
}

/// GOAWAY status codes (section 2.6.6).
pub mod goaway {
    pub const OK: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INTERNAL_ERROR: u32 = 2;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    TooLong { len: usize, limit: usize },
    #[error("unsupported SPDY version {0}")]
    Version(u16),
    #[error("malformed {kind} frame: {why}")]
    Malformed { kind: &'static str, why: String },
    #[error("header block: {0}")]
    Zlib(#[from] ZlibError),
}

fn malformed(kind: &'static str, why: impl Into<String>) -> FrameError {
    FrameError::Malformed {
        kind,
        why: why.into(),
    }
}

/// A header block: lower-case names, each with its values (NUL-joined on the wire).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, Vec<String>)>);

impl Headers {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.0
            .push((name.to_ascii_lowercase(), vec![value.to_string()]));
        self
    }

    /// The first value of `name` (names compare case-insensitively; the wire form is lower
    /// case but Go's `http.Header` canonicalises on its side, so be lenient).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.first())
            .map(String::as_str)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated_id: u32,
        priority: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    Headers {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    Data {
        stream_id: u32,
        flags: u8,
        data: Bytes,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings {
        flags: u8,
        /// (flags, id, value)
        entries: Vec<(u8, u32, u32)>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    /// A control frame of a type this codec does not know: the draft says to ignore it.
    Unknown {
        frame_type: u16,
    },
}

/// Reads frames from a byte buffer, owning the receive direction's zlib context.
pub struct FrameDecoder {
    inflater: HeaderInflater,
    max_frame_len: usize,
}

impl FrameDecoder {
    pub fn new(max_frame_len: usize, max_header_block: usize) -> Self {
        Self {
            inflater: HeaderInflater::new(max_header_block),
            max_frame_len: max_frame_len.min(MAX_WIRE_LEN),
        }
    }

    /// Takes one frame off the front of `buf`, or returns `Ok(None)` if `buf` does not yet
    /// hold a whole frame. After an error the connection must be closed: the zlib context
    /// may be out of step with the peer's.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let word = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let flags = buf[4];
        let len = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]) as usize;
        if len > self.max_frame_len {
            return Err(FrameError::TooLong {
                len,
                limit: self.max_frame_len,
            });
        }
        if buf.len() < 8 + len {
            // Reserve what the frame needs (bounded by the check above) so the reader
            // does not reallocate piecemeal.
            buf.reserve(8 + len - buf.len());
            return Ok(None);
        }
        buf.advance(8);
        let mut body = buf.split_to(len).freeze();
        if word & 0x8000_0000 == 0 {
            let stream_id = word & 0x7fff_ffff;
            if stream_id == 0 {
                return Err(malformed("DATA", "stream id 0"));
            }
            return Ok(Some(Frame::Data {
                stream_id,
                flags,
                data: body,
            }));
        }
        let version = ((word >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        let frame_type = (word & 0xffff) as u16;
        let frame = match frame_type {
            TYPE_SYN_STREAM => {
                need(&body, 10, "SYN_STREAM")?;
                let stream_id = body.get_u32() & 0x7fff_ffff;
                let associated_id = body.get_u32() & 0x7fff_ffff;
                let priority = body.get_u8() >> 5;
                let _slot = body.get_u8();
                // Inflate before validating the id: the zlib context must advance even for
                // a frame we reject, or every later header block fails to inflate.
                let headers = self.headers(&body, "SYN_STREAM")?;
                if stream_id == 0 {
                    return Err(malformed("SYN_STREAM", "stream id 0"));
                }
                Frame::SynStream {
                    stream_id,
                    associated_id,
                    priority,
                    flags,
                    headers,
                }
            }
            TYPE_SYN_REPLY | TYPE_HEADERS => {
                let kind = if frame_type == TYPE_SYN_REPLY {
                    "SYN_REPLY"
                } else {
                    "HEADERS"
                };
                need(&body, 4, kind)?;
                let stream_id = body.get_u32() & 0x7fff_ffff;
                let headers = self.headers(&body, kind)?;
                if stream_id == 0 {
                    return Err(malformed(kind, "stream id 0"));
                }
                if frame_type == TYPE_SYN_REPLY {
                    Frame::SynReply {
                        stream_id,
                        flags,
                        headers,
                    }
                } else {
                    Frame::Headers {
                        stream_id,
                        flags,
                        headers,
                    }
                }
            }
            TYPE_RST_STREAM => {
                exact(&body, 8, "RST_STREAM")?;
                let stream_id = body.get_u32() & 0x7fff_ffff;
                let status = body.get_u32();
                if stream_id == 0 || status == 0 {
                    return Err(malformed("RST_STREAM", "stream id or status 0"));
                }
                Frame::RstStream { stream_id, status }
            }
            TYPE_SETTINGS => {
                need(&body, 4, "SETTINGS")?;
                let n = body.get_u32() as usize;
                // Count checked against the bytes present before any allocation.
                if n.checked_mul(8) != Some(body.remaining()) {
                    return Err(malformed("SETTINGS", "entry count disagrees with length"));
                }
                let entries = (0..n)
                    .map(|_| {
                        let id = body.get_u32();
                        ((id >> 24) as u8, id & 0x00ff_ffff, body.get_u32())
                    })
                    .collect();
                Frame::Settings { flags, entries }
            }
            TYPE_PING => {
                exact(&body, 4, "PING")?;
                Frame::Ping { id: body.get_u32() }
            }
            TYPE_GOAWAY => {
                exact(&body, 8, "GOAWAY")?;
                Frame::GoAway {
                    last_good_stream_id: body.get_u32() & 0x7fff_ffff,
                    status: body.get_u32(),
                }
            }
            TYPE_WINDOW_UPDATE => {
                exact(&body, 8, "WINDOW_UPDATE")?;
                let stream_id = body.get_u32() & 0x7fff_ffff;
                let delta = body.get_u32() & 0x7fff_ffff;
                if delta == 0 {
                    return Err(malformed("WINDOW_UPDATE", "delta 0"));
                }
                Frame::WindowUpdate { stream_id, delta }
            }
            other => Frame::Unknown { frame_type: other },
        };
        Ok(Some(frame))
    }

    fn headers(&mut self, compressed: &[u8], kind: &'static str) -> Result<Headers, FrameError> {
        let block = self.inflater.inflate(compressed)?;
        parse_header_block(&block).map_err(|why| malformed(kind, why))
    }
}

fn need(body: &Bytes, n: usize, kind: &'static str) -> Result<(), FrameError> {
    if body.len() < n {
        return Err(malformed(kind, format!("{} bytes, need {n}", body.len())));
    }
    Ok(())
}

fn exact(body: &Bytes, n: usize, kind: &'static str) -> Result<(), FrameError> {
    if body.len() != n {
        return Err(malformed(kind, format!("{} bytes, want {n}", body.len())));
    }
    Ok(())
}

/// Parses an inflated name/value block (section 2.6.10): a 32-bit count, then per pair a
/// 32-bit length and name, a 32-bit length and NUL-separated values.
pub fn parse_header_block(mut b: &[u8]) -> Result<Headers, String> {
    fn take<'a>(b: &mut &'a [u8], what: &str) -> Result<&'a [u8], String> {
        if b.len() < 4 {
            return Err(format!("truncated before {what} length"));
        }
        let n = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        *b = &b[4..];
        if b.len() < n {
            return Err(format!("{what} of {n} bytes runs past the block"));
        }
        let (s, rest) = b.split_at(n);
        *b = rest;
        Ok(s)
    }
    if b.len() < 4 {
        return Err("no pair count".into());
    }
    let count = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    b = &b[4..];
    // Each pair takes at least 8 bytes: a larger count is a lie, refused before allocating.
    if count > b.len() / 8 {
        return Err(format!("{count} pairs cannot fit in {} bytes", b.len()));
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let name = take(&mut b, "name")?;
        if name.is_empty() {
            return Err("empty header name".into());
        }
        let name = std::str::from_utf8(name).map_err(|_| "header name is not UTF-8")?;
        if out.iter().any(|(n, _): &(String, Vec<String>)| n == name) {
            return Err(format!("duplicate header {name}"));
        }
        let value = take(&mut b, "value")?;
        let value = std::str::from_utf8(value).map_err(|_| "header value is not UTF-8")?;
        let values = value.split('\0').map(str::to_string).collect();
        out.push((name.to_ascii_lowercase(), values));
    }
    if !b.is_empty() {
        return Err(format!("{} bytes after the last pair", b.len()));
    }
    Ok(Headers(out))
}

/// Serialises an uncompressed name/value block.
pub fn header_block(h: &Headers) -> Vec<u8> {
    let mut out = Vec::new();
    out.put_u32(h.0.len() as u32);
    for (name, values) in &h.0 {
        let name = name.to_ascii_lowercase();
        out.put_u32(name.len() as u32);
        out.put_slice(name.as_bytes());
        let v = values.join("\0");
        out.put_u32(v.len() as u32);
        out.put_slice(v.as_bytes());
    }
    out
}

/// Writes frames, owning the send direction's zlib context.
#[derive(Default)]
pub struct FrameEncoder {
    deflater: HeaderDeflater,
}

impl FrameEncoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn encode(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), FrameError> {
        match frame {
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                if data.len() > MAX_WIRE_LEN {
                    return Err(FrameError::TooLong {
                        len: data.len(),
                        limit: MAX_WIRE_LEN,
                    });
                }
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_u32((u32::from(*flags) << 24) | data.len() as u32);
                out.put_slice(data);
            }
            Frame::SynStream {
                stream_id,
                associated_id,
                priority,
                flags,
                headers,
            } => {
                let block = self.deflater.compress(&header_block(headers))?;
                control(out, TYPE_SYN_STREAM, *flags, 10 + block.len())?;
                out.put_u32(*stream_id);
                out.put_u32(*associated_id);
                out.put_u8((priority & 7) << 5);
                out.put_u8(0);
                out.put_slice(&block);
            }
            Frame::SynReply {
                stream_id,
                flags,
                headers,
            }
            | Frame::Headers {
                stream_id,
                flags,
                headers,
            } => {
                let t = if matches!(frame, Frame::SynReply { .. }) {
                    TYPE_SYN_REPLY
                } else {
                    TYPE_HEADERS
                };
                let block = self.deflater.compress(&header_block(headers))?;
                control(out, t, *flags, 4 + block.len())?;
                out.put_u32(*stream_id);
                out.put_slice(&block);
            }
            Frame::RstStream { stream_id, status } => {
                control(out, TYPE_RST_STREAM, 0, 8)?;
                out.put_u32(*stream_id);
                out.put_u32(*status);
            }
            Frame::Settings { flags, entries } => {
                control(out, TYPE_SETTINGS, *flags, 4 + 8 * entries.len())?;
                out.put_u32(entries.len() as u32);
                for (f, id, v) in entries {
                    out.put_u32((u32::from(*f) << 24) | (id & 0x00ff_ffff));
                    out.put_u32(*v);
                }
            }
            Frame::Ping { id } => {
                control(out, TYPE_PING, 0, 4)?;
                out.put_u32(*id);
            }
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                control(out, TYPE_GOAWAY, 0, 8)?;
                out.put_u32(*last_good_stream_id);
                out.put_u32(*status);
            }
            Frame::WindowUpdate { stream_id, delta } => {
                control(out, TYPE_WINDOW_UPDATE, 0, 8)?;
                out.put_u32(*stream_id);
                out.put_u32(*delta);
            }
            Frame::Unknown { frame_type } => {
                return Err(malformed(
                    "unknown",
                    format!("cannot send type {frame_type}"),
                ));
            }
        }
        Ok(())
    }
}

fn control(out: &mut BytesMut, t: u16, flags: u8, len: usize) -> Result<(), FrameError> {
    if len > MAX_WIRE_LEN {
        return Err(FrameError::TooLong {
            len,
            limit: MAX_WIRE_LEN,
        });
    }
    out.put_u16(0x8000 | VERSION);
    out.put_u16(t);
    out.put_u32((u32::from(flags) << 24) | len as u32);
    Ok(())
}

#[cfg(test)]
#[path = "frame_tests.rs"]
mod tests;
