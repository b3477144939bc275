//! SPDY/3 header-block compression: one zlib stream per direction of a connection, primed
//! with the SPDY/3 dictionary, each header block ending at a SYNC_FLUSH.
//!
//! The inflating side is where a hostile peer attacks: a few bytes of deflate can expand to
//! megabytes. Inflation therefore writes into a buffer that never grows past
//! `max_inflated`, and a block that would need more is an error (the connection is then
//! unusable: the zlib context of that direction is desynchronised).

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::dictionary::SPDY3_DICTIONARY;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ZlibError {
    #[error("header block inflates past {limit} bytes")]
    TooLarge { limit: usize },
    #[error("header block is not valid zlib data: {0}")]
    Corrupt(String),
    #[error("header block ends inside a deflate block")]
    Truncated,
    #[error("header compression failed: {0}")]
    Compress(String),
}

/// The sending direction's compression context.
pub struct HeaderDeflater {
    z: Compress,
}

impl Default for HeaderDeflater {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderDeflater {
    pub fn new() -> Self {
        let mut z = Compress::new(Compression::default(), true);
        // Setting the dictionary before any input puts its id in the zlib header, which is
        // what every SPDY/3 peer expects.
        z.set_dictionary(SPDY3_DICTIONARY)
            .expect("a fresh zlib stream accepts a dictionary");
        Self { z }
    }

    /// Compresses one header block, ending it at a sync flush so the peer can inflate it
    /// without waiting for more input.
    pub fn compress(&mut self, block: &[u8]) -> Result<Vec<u8>, ZlibError> {
        let mut out = Vec::with_capacity(block.len() / 2 + 64);
        let start_in = self.z.total_in();
        loop {
            let consumed = (self.z.total_in() - start_in) as usize;
            if out.capacity() - out.len() < 64 {
                out.reserve(4096);
            }
            self.z
                .compress_vec(&block[consumed..], &mut out, FlushCompress::Sync)
                .map_err(|e| ZlibError::Compress(e.to_string()))?;
            let consumed = (self.z.total_in() - start_in) as usize;
            // A sync flush is complete when all input is taken and there was room left over
            // (zlib stops short only when the output buffer fills).
            if consumed == block.len() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }
}

/// The receiving direction's decompression context.
pub struct HeaderInflater {
    z: Decompress,
    max_inflated: usize,
    dictionary_set: bool,
}

impl HeaderInflater {
    pub fn new(max_inflated: usize) -> Self {
        Self {
            z: Decompress::new(true),
            max_inflated,
            dictionary_set: false,
        }
    }

    /// Inflates one compressed header block (the rest of a SYN_STREAM, SYN_REPLY or
    /// HEADERS frame). All of `input` must be consumed: header blocks end at a flush point.
    pub fn inflate(&mut self, input: &[u8]) -> Result<Vec<u8>, ZlibError> {
        let mut out: Vec<u8> = Vec::with_capacity(input.len().saturating_mul(4).min(4096));
        let start_in = self.z.total_in();
        loop {
            let consumed = (self.z.total_in() - start_in) as usize;
            if out.len() == out.capacity() {
                if out.len() > self.max_inflated {
                    return Err(ZlibError::TooLarge {
                        limit: self.max_inflated,
                    });
                }
                // Grow, but never past the limit (+1 so that reaching it is detectable).
                let want = (out.capacity() * 2).clamp(1024, self.max_inflated + 1);
                out.reserve_exact(want - out.len());
            }
            let before_out = out.len();
            let status = self
                .z
                .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync);
            match status {
                Ok(Status::Ok) | Ok(Status::BufError) => {}
                Ok(Status::StreamEnd) => {
                    // A SPDY header stream never ends; a peer that ends it has broken the
                    // context for every later frame.
                    return Err(ZlibError::Corrupt("zlib stream ended".into()));
                }
                Err(e) if e.needs_dictionary().is_some() && !self.dictionary_set => {
                    self.z
                        .set_dictionary(SPDY3_DICTIONARY)
                        .map_err(|e| ZlibError::Corrupt(format!("dictionary refused: {e}")))?;
                    self.dictionary_set = true;
                    continue;
                }
                Err(e) => return Err(ZlibError::Corrupt(e.to_string())),
            }
            if out.len() > self.max_inflated {
                return Err(ZlibError::TooLarge {
                    limit: self.max_inflated,
                });
            }
            let consumed_now = (self.z.total_in() - start_in) as usize;
            let progressed = out.len() > before_out || consumed_now > consumed;
            if consumed_now == input.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            if !progressed && out.len() < out.capacity() {
                // Input left, room left, and zlib made no progress: the block is cut short.
                return Err(ZlibError::Truncated);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_is_the_spdy3_one() {
        // Length and Adler-32 of the SPDY/3 draft's dictionary; a one-byte slip in the table
        // changes the checksum, and then no real peer can inflate our headers.
        assert_eq!(SPDY3_DICTIONARY.len(), 1423);
        let mut z = Compress::new(Compression::default(), true);
        assert_eq!(z.set_dictionary(SPDY3_DICTIONARY).unwrap(), 0xe3c6_a7c2);
        assert!(SPDY3_DICTIONARY.ends_with(b"enq=0."));
    }

    #[test]
    fn round_trip_shares_context_across_blocks() {
        let mut d = HeaderDeflater::new();
        let mut i = HeaderInflater::new(64 * 1024);
        for n in 0..5 {
            let block = format!("\0\0\0\x01\0\0\0\x0astreamtype\0\0\0\x06stdout{n}").into_bytes();
            let c = d.compress(&block).unwrap();
            assert_eq!(i.inflate(&c).unwrap(), block);
        }
    }

    #[test]
    fn inflating_past_the_limit_is_an_error() {
        let mut d = HeaderDeflater::new();
        let block = vec![b'a'; 200_000];
        let c = d.compress(&block).unwrap();
        assert!(c.len() < 2_000, "zeros compress well: {}", c.len());
        let mut i = HeaderInflater::new(64 * 1024);
        assert_eq!(i.inflate(&c), Err(ZlibError::TooLarge { limit: 64 * 1024 }));
    }

    #[test]
    fn exactly_the_limit_is_accepted() {
        let mut d = HeaderDeflater::new();
        let block = vec![b'x'; 4096];
        let c = d.compress(&block).unwrap();
        let mut i = HeaderInflater::new(4096);
        assert_eq!(i.inflate(&c).unwrap().len(), 4096);
    }

    #[test]
    fn garbage_is_an_error() {
        let mut i = HeaderInflater::new(64 * 1024);
        assert!(i.inflate(b"\x00\x01\x02garbage").is_err());
    }

    #[test]
    fn wrong_dictionary_is_refused() {
        // A stream compressed with another dictionary names another dictionary id.
        let mut z = Compress::new(Compression::default(), true);
        z.set_dictionary(b"some other dictionary").unwrap();
        let mut out = Vec::with_capacity(256);
        z.compress_vec(b"hello", &mut out, FlushCompress::Sync)
            .unwrap();
        let mut i = HeaderInflater::new(1024);
        assert!(matches!(i.inflate(&out), Err(ZlibError::Corrupt(_))));
    }
}
