//! virtio-vsock, hybrid flavour: the guest sees a vsock device, the host sees Unix sockets.
//!
//! The wire protocol on the host side is Firecracker's, so tools written for Firecracker's
//! vsock work unchanged:
//! - host → guest: a client connects to the Unix socket at `uds_path` and writes
//!   `CONNECT <port>\n`; once the guest accepts, the device answers `OK <host port>\n` and the
//!   socket then carries the stream's bytes both ways;
//! - guest → host: a guest `connect(2, P)` makes the device connect to `<uds_path>_<P>`.
//!
//! Layout, bottom up:
//! - `packet`: the 44-byte header and moving packets in and out of descriptor chains;
//! - `host_sock`: the two socket calls std does not offer without blocking or SIGPIPE;
//! - `connection`: one stream's state machine and credit accounting;
//! - `muxer`: all streams, the listener and the host-side epoll set;
//! - `device`: the virtio device (queues, config space, event-loop wiring).
//!
//! Wiring: build it with [`Vsock::new`] (which binds the listener), share it between the
//! MMIO transport and the VMM's `EventManager` (e.g. one `Arc<Mutex<Vsock>>` given to both);
//! `init` registers the activation eventfd and the muxer's epoll fd, and activation does the
//! rest on the event-loop thread. Dropping the device closes every stream and removes the
//! socket file.

mod connection;
mod device;
mod host_sock;
mod muxer;
mod packet;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use device::{Vsock, VSOCK_QUEUE_SIZES};
pub use muxer::MAX_CONNECTIONS;
pub use packet::VsockHeader;

/// The CID of the host, as the guest addresses it.
pub const HOST_CID: u64 = 2;

/// Everything that can go wrong in the vsock device, from construction to a malformed packet.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved or out of range (valid: 3..=0xfffffffe)")]
    InvalidCid(u64),
    #[error("vsock socket {0} is in use by another listener")]
    AddressInUse(PathBuf),
    #[error("vsock socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot remove stale vsock socket {path}: {source}")]
    RemoveStale {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on vsock socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create vsock event sources: {0}")]
    EventSetup(std::io::Error),
    #[error("descriptor chain is not usable: {0}")]
    DescriptorChain(virtio_queue::Error),
    #[error("descriptor chain holds {have} bytes, less than a packet header")]
    HeaderTooShort { have: usize },
    #[error("packet payload of {len} bytes exceeds the {max}-byte cap")]
    PayloadTooLarge {
        hdr: Box<VsockHeader>,
        len: u32,
        max: usize,
    },
    #[error("packet claims {len} payload bytes but its buffers hold {have}")]
    PayloadTruncated {
        hdr: Box<VsockHeader>,
        len: u32,
        have: usize,
    },
    #[error("guest memory access: {0}")]
    GuestMemory(std::io::Error),
}
