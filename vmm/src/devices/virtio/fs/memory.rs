//! Guest memory that virtiofsd can map.
//!
//! virtiofsd reads requests from and writes replies to guest memory directly, so it must map
//! the same pages as the VMM: each region is a memfd mapped `MAP_SHARED`, and the fd travels to
//! virtiofsd in VHOST_USER_SET_MEM_TABLE. Anonymous private memory (what
//! `GuestMemoryMmap::from_ranges` gives) cannot be shared that way.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use super::FsError;
use crate::devices::virtio::GuestMemory;

/// Creates guest memory with one memfd-backed, shared mapping per `(start, size)` range (sorted,
/// non-overlapping, as for `GuestMemoryMmap::from_ranges`). The VMM builder uses this instead of
/// anonymous memory when the VM has a virtio-fs device.
pub fn shared_guest_memory(ranges: &[(GuestAddress, usize)]) -> Result<GuestMemory, FsError> {
    let regions = ranges
        .iter()
        .map(|&(start, size)| {
            let file = memfd(size)?;
            crate::vstate::memory::map_guest_ram(start, size, Some(FileOffset::new(file, 0)))
                .map_err(|e| {
                    FsError::GuestMemory(format!("mapping {size:#x} bytes at {:#x}: {e}", start.0))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(|e| FsError::GuestMemory(e.to_string()))
}

/// An anonymous memory file of `size` bytes, closed on exec so child processes do not inherit
/// guest memory.
fn memfd(size: usize) -> Result<File, FsError> {
    // SAFETY: the name is a NUL-terminated C string that memfd_create only reads during the call;
    // the return value is checked below.
    let fd = unsafe { libc::memfd_create(c"husk-guest-mem".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(FsError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    // Sized before mapping: touching a shared mapping past the end of its file raises SIGBUS.
    file.set_len(size as u64).map_err(FsError::Memfd)?;
    Ok(file)
}
