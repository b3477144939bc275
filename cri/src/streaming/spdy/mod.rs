//! SPDY/3.1 as Kubernetes streaming speaks it (moby/spdystream on the client side):
//! `frame` is the codec, `zlib` the header compression, `session` the multiplexed
//! connection over an upgraded socket.

pub mod dictionary;
pub mod frame;
pub mod session;
pub mod zlib;

pub use frame::{Frame, FrameDecoder, FrameEncoder, FrameError, Headers};
pub use session::{Session, SessionConfig, SessionError, Stream, StreamReader, StreamWriter};
