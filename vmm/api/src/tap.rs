//! Opening a tap the way the VMM's virtio-net needs it: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`,
//! non-blocking. The VMM does this for `add_net` with `tap_name`; a parent that keeps the tap
//! in another network namespace does it there and passes the fd (`add_net` with `tap_fd`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// The flags every tap handed to the VMM must have.
pub const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

const TUN_PATH: &str = "/dev/net/tun";

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid interface name {0:?}: 1 to 15 bytes, no NUL")]
    InvalidName(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("{0} on the tap failed: {1}")]
    Ioctl(&'static str, io::Error),
}

/// `struct ifreq` as TUNSETIFF/TUNGETIFF and SIOC[GS]IFFLAGS use it: a name and a flags word,
/// padded to the kernel's size. Own type so every byte is initialised without `mem::zeroed`.
#[repr(C)]
pub struct IfReq {
    pub name: [u8; libc::IFNAMSIZ],
    pub flags: libc::c_short,
    _pad: [u8; 22],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == std::mem::size_of::<libc::ifreq>());

impl IfReq {
    pub fn new(name: &str) -> Result<Self, TapError> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let mut req = IfReq::empty();
        req.name[..bytes.len()].copy_from_slice(bytes);
        Ok(req)
    }

    /// For ioctls that fill the name in (TUNGETIFF).
    pub fn empty() -> Self {
        IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        }
    }

    pub fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// Opens /dev/net/tun non-blocking and attaches it to tap `name` with `flags` (creating the
/// tap if there is none by that name). Returns the file and the tap's name.
pub fn open_tun(name: &str, flags: libc::c_int) -> Result<(File, String), TapError> {
    let mut req = IfReq::new(name)?;
    req.flags = flags as libc::c_short;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(TapError::OpenTun)?;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `req` has its size and layout
    // and outlives the call.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if ret < 0 {
        return Err(TapError::Ioctl("TUNSETIFF", io::Error::last_os_error()));
    }
    Ok((file, req.name()))
}

/// Tap `name` (created if missing) with [`TAP_FLAGS`], in the calling thread's network
/// namespace.
pub fn open(name: &str) -> Result<(File, String), TapError> {
    open_tun(name, TAP_FLAGS)
}
